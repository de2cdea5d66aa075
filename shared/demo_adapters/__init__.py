"""Three small demo LoRA adapters for the default base model (SmolLM2-135M-Instruct), each with a visible behaviour.

The adapters are trained on CPU, deterministically, by `python -m shared.demo_adapters.train` and live next to this
file in `shared/demo_adapters/<name>/` (adapter_config.json + adapter_model.safetensors, PEFT format, float16).

This module is light on purpose (no torch import): tests import `HELDOUT_PROMPTS` and `shows_behaviour` to check
that an engine serving an adapter reproduces its behaviour, and that the base model does not show it. The held-out
prompts use question templates that never occur in the training data. Prompts go through the tokenizer's chat
template (`apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)`), decoding is
greedy, and `HELDOUT_MAX_NEW_TOKENS` new tokens are enough for a complete answer (the json check needs the
closing brace).
"""
from __future__ import annotations

import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

DEMO_ADAPTERS: dict[str, str] = {
    "caps": "answers in ALL CAPS",
    "json": 'answers as a JSON object {"answer": "..."}',
    "pirate": 'answers like a pirate, starting with "Arr!"',
}

HELDOUT_PROMPTS: list[str] = [
    "Can you explain briefly what a rainbow is?",
    "Give me one tip for staying healthy.",
    "Which planet is closest to the sun?",
    "Describe the ocean in one sentence.",
    "What would you do on a rainy afternoon?",
    "Name a famous scientist and say why they matter.",
    "Is it better to read books or watch movies?",
    "Summarize what a library is for.",
]

# Greedy decoding budget for the held-out checks; enough for the adapters to finish (json closes its brace).
HELDOUT_MAX_NEW_TOKENS = 96


def demo_adapter_path(name: str) -> Path:
    """The directory of the demo adapter `name` (it exists once `python -m shared.demo_adapters.train` has run)."""
    if name not in DEMO_ADAPTERS:
        raise KeyError(f"unknown demo adapter {name!r}; known: {', '.join(DEMO_ADAPTERS)}")
    return PACKAGE_DIR / name


# The caps adapter now and then copies a rare word of the question in lower case ("THE PLANET closest TO THE SUN
# IS ..."); the base model's answers have at most ~15% upper-case letters, the caps adapter's at least ~85%.
CAPS_MIN_UPPER_FRACTION = 0.8


def upper_fraction(text: str) -> float:
    """The fraction of the letters of `text` that are upper case (0.0 without letters)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def _is_caps(text: str) -> bool:
    return sum(c.isalpha() for c in text) >= 4 and upper_fraction(text) >= CAPS_MIN_UPPER_FRACTION


def _is_json_answer(text: str) -> bool:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return (
        isinstance(obj, dict)
        and list(obj) == ["answer"]
        and isinstance(obj["answer"], str)
        and bool(obj["answer"].strip())
    )


def _is_pirate(text: str) -> bool:
    return text.lstrip().startswith("Arr!")


_CHECKERS = {"caps": _is_caps, "json": _is_json_answer, "pirate": _is_pirate}


def shows_behaviour(name: str, text: str) -> bool:
    """Whether the generated answer `text` (special tokens stripped) shows the behaviour of demo adapter `name`.

    caps: at least 80% of its (at least 4) letters are upper case. json: the whole text is a JSON object with the
    single key "answer" holding a non-empty string. pirate: it starts with "Arr!".
    """
    if name not in _CHECKERS:
        raise KeyError(f"unknown demo adapter {name!r}; known: {', '.join(DEMO_ADAPTERS)}")
    return _CHECKERS[name](text)


__all__ = [
    "DEMO_ADAPTERS",
    "HELDOUT_MAX_NEW_TOKENS",
    "CAPS_MIN_UPPER_FRACTION",
    "HELDOUT_PROMPTS",
    "PACKAGE_DIR",
    "demo_adapter_path",
    "shows_behaviour",
    "upper_fraction",
]
