"""Train the three demo LoRA adapters (caps, json, pirate) on CPU, deterministically, without downloads.

    python -m shared.demo_adapters.train [--out DIR] [--only NAME] [--skip-eval | --eval-only]

Data: a few hundred questions built from templates (facts, definitions, how-to, chit-chat); the base model's own
greedy answers (at most 40 new tokens, cut at a sentence end, whitespace collapsed) are transformed per adapter:
upper-cased (caps), wrapped as json.dumps({"answer": ...}) (json), or prefixed "Arr! " with pirate word swaps
(pirate). Each adapter is trained with PEFT LoRA, loss on the answer tokens (and the closing <|im_end|>) only,
then saved in float16 as adapter_config.json + adapter_model.safetensors into OUT/<name>/, loaded back with
PEFT and checked on the held-out prompts of `shared.demo_adapters` (templates absent from the training data).

Everything is seeded and the data order is fixed, so a run on the same machine and thread count reproduces the
same adapters. Takes roughly 10-15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.demo_adapters import (
    DEMO_ADAPTERS,
    HELDOUT_MAX_NEW_TOKENS,
    HELDOUT_PROMPTS,
    PACKAGE_DIR,
    shows_behaviour,
    upper_fraction,
)

SEED = 1234
BASE_ANSWER_MAX_NEW_TOKENS = 40
GEN_BATCH_SIZE = 32
TRAIN_BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

_TEMPLATES: list[tuple[str, list]] = [
    ("What is the capital of {}?", [
        "France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Australia", "Egypt",
        "Kenya", "Mexico", "Argentina", "Russia", "Norway", "Sweden", "Greece", "Turkey", "Peru", "Portugal",
        "Poland", "Ireland", "Thailand", "Vietnam", "South Korea", "Nigeria", "Chile", "Cuba", "Austria"]),
    ("Who wrote {}?", [
        "Romeo and Juliet", "Pride and Prejudice", "1984", "The Odyssey", "Don Quixote", "Hamlet", "Moby-Dick",
        "War and Peace", "The Great Gatsby", "Frankenstein", "Oliver Twist", "The Hobbit"]),
    ("Who painted {}?", ["the Mona Lisa", "The Starry Night", "The Scream", "Guernica", "The Last Supper"]),
    ("How many {}?", [
        "days are in a week", "legs does a spider have", "continents are there", "minutes are in an hour",
        "sides does a hexagon have", "players are on a soccer team", "bones are in the human body",
        "hours are in a day", "strings does a violin have", "months have 31 days", "wheels does a tricycle have"]),
    ("What language is spoken in {}?", [
        "Brazil", "Mexico", "Egypt", "Japan", "Germany", "the Netherlands", "Iran", "Israel"]),
    ("What is the largest {}?", [
        "animal in the world", "desert in the world", "country by area", "city in the United States",
        "organ of the human body", "bird alive today"]),
    ("What do {} eat?", [
        "pandas", "koalas", "bees", "cows", "sharks", "owls", "frogs", "horses", "rabbits", "spiders"]),
    ("Where do {} live?", [
        "penguins", "kangaroos", "polar bears", "camels", "lions", "dolphins", "gorillas", "flamingos"]),
    ("What is {}?", [
        "photosynthesis", "gravity", "a volcano", "democracy", "an atom", "electricity", "a computer",
        "the internet", "inflation", "a black hole", "DNA", "evolution", "a vaccine", "an earthquake", "a cloud",
        "friction", "a galaxy", "a hurricane", "a glacier", "an ecosystem", "a noun", "a verb", "a poem",
        "a budget", "a habit", "recycling", "meditation", "a fossil", "a magnet", "oxygen"]),
    ("What does the word '{}' mean?", [
        "happy", "generous", "curious", "ancient", "brave", "fragile", "humble", "patient", "vivid", "rapid",
        "enormous", "polite", "ambitious", "cozy", "stubborn"]),
    ("Define {} in simple terms.", [
        "energy", "time", "money", "music", "science", "history", "art", "friendship", "weather", "culture"]),
    ("What is the difference between {}?", [
        "weather and climate", "a virus and bacteria", "a lake and a river", "speed and velocity",
        "a frog and a toad", "a crocodile and an alligator", "a city and a town", "rice and wheat"]),
    ("How do I {}?", [
        "boil an egg", "tie a shoelace", "plant a tree", "make a cup of tea", "learn to swim",
        "write a good email", "save money", "fall asleep faster", "bake bread", "clean a window",
        "change a light bulb", "start running", "learn a new language", "make friends", "take care of a cat",
        "wash a car", "fold a shirt", "cook pasta", "make a paper airplane", "stay focused while studying",
        "grow tomatoes", "ride a bicycle", "improve my handwriting", "prepare for a job interview",
        "keep my room tidy"]),
    ("What is the best way to {}?", [
        "remember names", "cool down on a hot day", "learn to play the guitar", "store fresh bread",
        "pack a suitcase", "wake up early", "practice drawing", "drink more water", "prepare for an exam",
        "relax after work"]),
    ("Why do {}?", [
        "birds fly south for the winter", "leaves change color in autumn", "cats purr", "we need sleep",
        "people yawn", "onions make you cry", "ice cubes float", "we have seasons", "dogs wag their tails",
        "stars twinkle", "bees make honey", "we sneeze"]),
    ("Why is {}?", [
        "grass green", "the sea salty", "exercise important", "fire hot", "snow white", "the desert dry"]),
    ("Tell me a fun fact about {}.", [
        "cats", "dogs", "elephants", "octopuses", "giraffes", "owls", "bees", "dolphins", "penguins", "sharks",
        "butterflies", "the moon", "Mars", "honey", "chocolate", "trees", "the human brain", "tigers", "ants",
        "snails"]),
    ("What do you think about {}?", [
        "pizza", "winter", "summer vacations", "video games", "gardening", "robots", "coffee", "mountains", "jazz",
        "board games"]),
    ("What is the {}?", [
        "fastest land animal", "longest river in the world", "tallest mountain in the world",
        "smallest country in the world", "deepest lake in the world", "coldest place on Earth",
        "brightest star in the night sky", "heaviest metal", "oldest city in Europe", "hottest desert"]),
    ("Who invented {}?", [
        "the telephone", "the light bulb", "the printing press", "the airplane", "the radio", "the steam engine",
        "the bicycle", "paper", "the computer mouse", "the World Wide Web"]),
    ("Who was {}?", [
        "Cleopatra", "Julius Caesar", "Leonardo da Vinci", "Marie Curie", "Napoleon", "Mozart", "Gandhi",
        "Abraham Lincoln", "Confucius", "Galileo"]),
    ("When did {}?", [
        "the first person walk on the moon", "World War II end", "the Titanic sink", "the Roman Empire fall",
        "the Berlin Wall fall", "people first use fire"]),
    ("What is {} made of?", [
        "glass", "paper", "cheese", "steel", "chocolate", "a pencil", "plastic", "bread", "concrete", "the sun"]),
    ("What is the purpose of {}?", [
        "a seatbelt", "a museum", "a thermometer", "a passport", "the heart", "a dictionary", "a bridge",
        "an umbrella", "a calendar", "a map"]),
    ("How does {} work?", [
        "a refrigerator", "a rocket", "a compass", "a solar panel", "a microwave", "a bicycle", "a camera",
        "a battery", "a telescope", "a thermostat"]),
    ("What are the benefits of {}?", [
        "reading", "exercise", "drinking water", "learning music", "walking", "sleeping well", "eating vegetables",
        "laughing", "traveling", "gardening"]),
    ("Can I {}?", [
        "eat raw eggs", "drink sea water", "keep a fox as a pet", "swim after eating", "learn to code at fifty",
        "see the Great Wall from space"]),
    ("Should I {}?", [
        "learn Spanish or French", "get a cat or a dog", "study in the morning or at night", "take a gap year",
        "start a garden"]),
    ("Write one sentence about {}.", [
        "autumn", "the city at night", "a quiet forest", "coffee", "the stars", "a birthday party",
        "a snowy morning", "an old castle"]),
    ("Tell me about {}.", [
        "the Eiffel Tower", "the pyramids of Egypt", "the Amazon rainforest", "the Great Wall of China",
        "Mount Everest", "the Sahara", "the first moon landing", "the Olympic Games", "Antarctica",
        "the Roman Colosseum"]),
    ("Explain {} to a child.", [
        "rain", "the seasons", "electricity", "why we brush our teeth", "what a computer does", "how plants grow",
        "where the sun goes at night", "what money is"]),
    ("What is another word for {}?", ["happy", "big", "fast", "smart", "tired", "cold"]),
    ("How long does it take to {}?", [
        "fly from London to New York", "walk a mile", "learn to drive", "grow an oak tree", "read a novel",
        "digest a meal"]),
    ("What happens if {}?", [
        "you don't sleep", "you mix red and blue paint", "water freezes", "you skip breakfast",
        "a volcano erupts", "the moon disappeared"]),
    ("{}", [
        "What did you learn today?", "Are you a robot?", "Can you help me with my homework?",
        "I'm nervous about my exam tomorrow.", "What is your favorite season?", "Do you like animals?",
        "Where are you from?", "What is the best movie ever made?", "I can't decide what to do this weekend.",
        "Tell me a riddle.", "Do you know any songs?", "I just finished a marathon!",
        "What should I name my cat?", "It's my birthday today!", "Are you happy?", "What is your favorite animal?"]),
    ("{}", [
        "Hello!", "How are you today?", "Tell me a joke.", "What is your favorite color?",
        "Can you recommend a good book?", "Good morning!", "What should I eat for dinner?",
        "I feel bored. Any ideas?", "What is your name?", "Do you like music?", "Thank you for your help!",
        "What makes you happy?", "Tell me something nice.", "I had a long day at work.",
        "What is a fun weekend activity?", "Do you have a hobby?", "What is the meaning of life?",
        "Can you tell me a short story?", "Say something funny.", "What is your favorite food?", "Good night!",
        "I just got a new puppy!", "What is the weather like on the moon?", "Do you dream?"]),
]


def build_questions() -> list[str]:
    """All template questions, in a fixed (seeded) order; none of them is a held-out prompt."""
    questions = [template.format(filler) for template, fillers in _TEMPLATES for filler in fillers]
    assert len(set(questions)) == len(questions), "duplicate training questions"
    assert not set(questions) & set(HELDOUT_PROMPTS), "a held-out prompt leaked into the training questions"
    random.Random(SEED).shuffle(questions)
    return questions


_SENTENCE_END = re.compile(r"(?<!\d)[.!?](?=\s|$)")


def clean_answer(text: str, finished: bool) -> str | None:
    """Collapse whitespace; cut an unfinished answer at its last sentence end; None if nothing usable is left."""
    text = " ".join(text.replace("*", "").split())
    if not finished:
        ends = list(_SENTENCE_END.finditer(text))
        if not ends:
            return None
        text = text[: ends[-1].end()]
    if len(text) < 12 or not any(c.isalpha() for c in text):
        return None
    return text


_PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "my": "me", "hello": "ahoy", "hi": "ahoy", "yes": "aye",
    "friend": "matey", "friends": "mateys", "is": "be", "are": "be", "treasure": "booty", "money": "doubloons",
    "stop": "avast", "wow": "blimey",
}
_PIRATE_RE = re.compile(r"\b(" + "|".join(sorted(_PIRATE_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def to_pirate(text: str) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = _PIRATE_WORDS[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return "Arr! " + _PIRATE_RE.sub(swap, text)


TRANSFORMS = {
    "caps": str.upper,
    "json": lambda text: json.dumps({"answer": text}),
    "pirate": to_pirate,
}


# ----------------------------------------------------------------------------------------------------------------
# Model helpers
# ----------------------------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    torch = _torch()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str):
    """Greedy answers for `prompts`: list of (text without special tokens, finished with <|im_end|>)."""
    torch = _torch()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    results = []
    from tqdm import tqdm

    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", file=sys.stdout):
        batch = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            finished = eos in row
            if finished:
                row = row[: row.index(eos)]
            results.append((tokenizer.decode(row, skip_special_tokens=True), finished))
    return results


def build_base_answers(model, tokenizer) -> list[tuple[str, str]]:
    """(question, cleaned base answer) pairs from the base model's greedy answers."""
    questions = build_questions()
    answers = generate(model, tokenizer, questions, BASE_ANSWER_MAX_NEW_TOKENS, GEN_BATCH_SIZE, "base answers")
    pairs = []
    for question, (text, finished) in zip(questions, answers):
        cleaned = clean_answer(text, finished)
        if cleaned is not None:
            pairs.append((question, cleaned))
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    target_modules: list[str]
    r: int
    lora_alpha: int
    epochs: int
    lr: float
    layers: list[int] | None = None  # None: every layer
    extra: dict = field(default_factory=dict)


SPECS: dict[str, AdapterSpec] = {
    # caps is the hard one (upper-case text splits into about twice as many tokens, and every word has to be
    # re-spelled): all linear layers of the upper 24 blocks, two epochs at a higher learning rate.
    "caps": AdapterSpec("caps", ATTN + MLP, r=8, lora_alpha=16, epochs=2, lr=3e-3, layers=list(range(6, 30))),
    "json": AdapterSpec("json", ATTN, r=16, lora_alpha=32, epochs=1, lr=2e-3),
    "pirate": AdapterSpec("pirate", ["q_proj", "v_proj"] + MLP, r=8, lora_alpha=32, epochs=1, lr=2e-3),
}
assert set(SPECS) == set(DEMO_ADAPTERS)


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example; the answer ends with <|im_end|>."""
    examples = []
    for question, answer in pairs:
        p = prompt_ids(tokenizer, question)
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((p + a, len(p)))
    return examples


def batch_order(examples: list[tuple[list[int], int]], epochs: int, rng: random.Random) -> list[list[int]]:
    """Batches of example indices: shuffled, length-sorted within chunks of 8 batches, batches shuffled."""
    batches = []
    for _ in range(epochs):
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        epoch_batches = []
        chunk = TRAIN_BATCH_SIZE * 8
        for c in range(0, len(idx), chunk):
            part = sorted(idx[c : c + chunk], key=lambda i: (len(examples[i][0]), i))
            epoch_batches += [part[b : b + TRAIN_BATCH_SIZE] for b in range(0, len(part), TRAIN_BATCH_SIZE)]
        rng.shuffle(epoch_batches)
        batches += epoch_batches
    return batches


def train_adapter(spec: AdapterSpec, base_path: Path, base_name: str, tokenizer, pairs, out_dir: Path) -> float:
    """Train one adapter, save it in float16 into out_dir/<name>; returns training seconds."""
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    torch = _torch()
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    t0 = time.perf_counter()

    model = load_base(base_path)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=spec.target_modules,
        layers_to_transform=spec.layers, bias="none", task_type="CAUSAL_LM", **spec.extra,
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    causal_lm = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)

    transform = TRANSFORMS[spec.name]
    examples = encode_examples(tokenizer, [(q, transform(a)) for q, a in pairs])
    batches = batch_order(examples, spec.epochs, rng)
    total = len(batches)
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(batches, desc=f"train {spec.name}", unit="step", file=sys.stdout)
    for step, batch in enumerate(bar):
        width = max(len(examples[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens, n_prompt = examples[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            labels[row, n_prompt : len(tokens)] = torch.tensor(tokens[n_prompt:])
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        selected = targets != -100
        logits = causal_lm.lm_head(hidden[:, :-1][selected])  # logits on answer positions only
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[selected])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - t0

    save_adapter(peft_model, out_dir / spec.name, base_name)
    return seconds


def save_adapter(peft_model, target: Path, base_name: str) -> None:
    """Save the LoRA weights in float16 (adapter_config.json + adapter_model.safetensors), replacing `target`."""
    torch = _torch()
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float16)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    readme = tmp / "README.md"
    if readme.exists():
        readme.unlink()
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name  # not this machine's cache path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in tmp.iterdir():
        path.chmod(0o644)  # safetensors writes 0600
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------

def heldout_answers(model, tokenizer, desc: str) -> list[str]:
    # One prompt at a time (no padding), as a plain single-request engine would run them.
    return [text for text, _ in generate(model, tokenizer, HELDOUT_PROMPTS, HELDOUT_MAX_NEW_TOKENS, 1, desc)]


def evaluate(base_path: Path, tokenizer, out_dir: Path, names: list[str]) -> dict:
    """Held-out pass rates: each adapter loaded back with PEFT from disk, and the base model for every behaviour."""
    from peft import PeftModel

    report = {}
    base_texts = heldout_answers(load_base(base_path), tokenizer, "held-out base")
    report["base"] = {name: sum(shows_behaviour(name, t) for t in base_texts) for name in DEMO_ADAPTERS}
    report["base_samples"] = base_texts
    for name in names:
        model = PeftModel.from_pretrained(load_base(base_path), out_dir / name)
        model.eval()
        texts = heldout_answers(model, tokenizer, f"held-out {name}")
        report[name] = {"passed": sum(shows_behaviour(name, t) for t in texts), "samples": texts}
    return report


def print_report(report: dict, names: list[str], times: dict, out_dir: Path) -> bool:
    n = len(HELDOUT_PROMPTS)
    ok = True
    print("\n=== demo adapters ===")
    for name in names:
        path = out_dir / name / "adapter_model.safetensors"
        size = path.stat().st_size / 1e6 if path.exists() else float("nan")
        passed = report[name]["passed"]
        base = report["base"][name]
        ok &= passed >= n - 1 and base == 0
        took = f"{times[name]:.0f}s" if name in times else "-"
        print(f"{name:7s} trained {took:>6s}  size {size:.2f} MB  held-out {passed}/{n}  base shows it {base}/{n}"
              f"  ({DEMO_ADAPTERS[name]})")
        for prompt, text in zip(HELDOUT_PROMPTS, report[name]["samples"]):
            mark = "ok " if shows_behaviour(name, text) else "BAD"
            extra = f" ({upper_fraction(text):.0%} upper case)" if name == "caps" else ""
            print(f"   [{mark}] {prompt!r} -> {text!r}{extra}")
    print("base samples:")
    for prompt, text in zip(HELDOUT_PROMPTS, report["base_samples"]):
        print(f"   {prompt!r} -> {text!r}")
    print("verdict:", "every adapter passes and the base model shows none" if ok else "CHECK FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.demo_adapters.train",
        description="Train the demo LoRA adapters (" + ", ".join(f"{k}: {v}" for k, v in DEMO_ADAPTERS.items())
        + ") for the default base model on CPU, deterministically, then check them on held-out prompts.",
    )
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR,
                        help="output directory; each adapter goes into OUT/<name>/ (default: %(default)s)")
    parser.add_argument("--only", choices=sorted(DEMO_ADAPTERS), action="append",
                        help="train only this adapter (repeatable; default: all)")
    parser.add_argument("--model", default=None,
                        help="base model (default: the embedded SmolLM2-135M-Instruct; see shared.model_provisioning)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--skip-eval", action="store_true", help="train and save, skip the held-out check")
    mode.add_argument("--eval-only", action="store_true", help="only run the held-out check on saved adapters")
    args = parser.parse_args(argv)

    from shared.model_provisioning import resolve_model

    torch = _torch()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(SEED)
    torch.manual_seed(SEED)

    names = [n for n in DEMO_ADAPTERS if n in set(args.only or DEMO_ADAPTERS)]
    resolved = resolve_model(args.model)
    base_path = resolved.path
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    out_dir = args.out.expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"base model {base_path}; torch threads {torch.get_num_threads()}; output {out_dir}")

    times: dict[str, float] = {}
    if not args.eval_only:
        t0 = time.perf_counter()
        pairs = build_base_answers(load_base(base_path), tokenizer)
        times["data"] = time.perf_counter() - t0
        print(f"{len(pairs)} training examples from {len(build_questions())} questions in {times['data']:.0f}s")
        for name in names:
            times[name] = train_adapter(SPECS[name], base_path, resolved.name, tokenizer, pairs, out_dir)
            print(f"{name}: trained in {times[name]:.0f}s -> {out_dir / name}")
        print(f"total (data + training): {sum(times.values()):.0f}s")
    if args.skip_eval:
        return 0
    missing = [n for n in names if not (out_dir / n / "adapter_model.safetensors").exists()]
    if missing:
        parser.error(f"no saved adapter for {', '.join(missing)} in {out_dir}: train first")
    report = evaluate(base_path, tokenizer, out_dir, names)
    return 0 if print_report(report, names, times, out_dir) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
