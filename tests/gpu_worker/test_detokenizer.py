"""IncrementalDetokenizer with the real tokenizer: UTF-8 safety, agreement with a full decode, stop strings."""
from __future__ import annotations

import pytest

from services.gpu_worker.engine.detokenizer import IncrementalDetokenizer

PROMPT = "Here is the answer:"

TEXTS = [
    "Hello world, this is plain ASCII text with numbers 12345 and symbols #@!.",
    "naïve café über Ærø — déjà vu, señor.",
    "日本語のテキスト 中文字符 한국어 텍스트",
    "🎉🚀 done 👍🏽 and 👨‍👩‍👧 family",
    "mixed: aé😀字 z",
]


def feed(tokenizer, text: str, stop: list[str], prompt: str = PROMPT):
    """Feed `text`'s tokens one at a time, as the engine does. Returns (pieces reported, stopped at token index)."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), stop)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = []
    for i, token in enumerate(ids):
        stopped = detok.add(token)
        final = stopped or i == len(ids) - 1
        pieces.append(detok.take(final=final))
        if stopped:
            return pieces, i, detok
    return pieces, None, detok


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_output_equals_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full == text  # the tokenizer round-trips these
    pieces, stopped, detok = feed(tokenizer, text, [])
    assert stopped is None
    assert "".join(pieces) == full
    assert detok.text == full
    for piece in pieces:
        assert "\ufffd" not in piece  # never half a character


def test_multibyte_characters_really_are_split_across_tokens(tokenizer):
    """Guards the test above: the emoji and CJK texts do exercise the hold-while-incomplete path."""
    for text in TEXTS[1:4]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces, _, _ = feed(tokenizer, TEXTS[3], [])
    assert "" in pieces  # some tokens produced nothing yet


def test_without_prompt_context(tokenizer):
    text = TEXTS[4]
    pieces, _, _ = feed(tokenizer, text, [], prompt="")
    assert "".join(pieces) == text


def test_leading_space_is_decoded_from_context(tokenizer):
    pieces, _, _ = feed(tokenizer, " world", [], prompt="Hello")
    assert "".join(pieces) == " world"


def test_special_tokens_are_skipped(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), [])
    ids = tokenizer.encode(" yes", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for t in ids:
        detok.add(t)
    assert detok.take(final=True) == " yes"


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello world, this is a test.", ["world"], "Hello "),
        ("The END of it", ["END"], "The "),
        ("Stop here: ### and more", ["###"], "Stop here: "),
        ("one two three four", ["four", "two"], "one "),  # the earliest match wins, whatever the list order
        ("naïve café über", ["café"], "naïve "),
        ("🎉🚀 done 👍🏽", ["👍"], "🎉🚀 done "),
        ("日本語のテキスト", ["テキ"], "日本語の"),
    ],
)
def test_stop_string_cuts_the_text_and_is_not_emitted(tokenizer, text, stop, expected):
    pieces, stopped, detok = feed(tokenizer, text, stop)
    assert stopped is not None
    assert "".join(pieces) == expected
    assert detok.text == expected
    for s in stop:
        assert s not in "".join(pieces)


def test_stop_string_split_across_tokens(tokenizer):
    # " STOPWORD" is tokenized ' ST', 'OP', 'W', 'ORD': the stop string "STOP" spans two tokens
    ids = tokenizer.encode("go on STOPWORD now", add_special_tokens=False)
    assert not any("STOP" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), ["STOP"])
    reported = ""
    for i, token in enumerate(ids):
        stopped = detok.add(token)
        reported += detok.take(final=stopped)
        if stopped:
            break
        assert "ST" not in reported  # a possible start of the stop string stays held back
    assert stopped
    assert reported == "go on "
    assert tokenizer.decode(ids[: i + 1]).endswith("STOP")  # it stopped on the token completing the stop string


def test_stop_string_spanning_the_first_generated_token_and_later_ones(tokenizer):
    pieces, stopped, _ = feed(tokenizer, "Hello world", ["lo wo"])
    assert stopped is not None and "".join(pieces) == "Hel"


def test_held_back_text_is_released_at_the_end_when_no_stop_matched(tokenizer):
    text = "Hello world, all good"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), ["zzzz"])  # never matches: holds 3 chars
    so_far = ""
    for token in ids:
        assert not detok.add(token)
        so_far += detok.take(final=False)
    assert so_far == text[:-3]  # the tail that could begin "zzzz" is held
    assert detok.take(final=True) == text[-3:]
    assert detok.take(final=True) == ""  # nothing twice


def test_partial_stop_match_that_does_not_complete_is_released(tokenizer):
    pieces, stopped, _ = feed(tokenizer, "The EN is not the END", ["ENDX"])
    assert stopped is None
    assert "".join(pieces) == "The EN is not the END"


def test_without_stop_strings_nothing_is_held(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), [])
    out = ""
    for token in tokenizer.encode(" abc def", add_special_tokens=False):
        detok.add(token)
        out += detok.take(final=False)
    assert out == " abc def"


def test_random_token_streams_match_full_decode(tokenizer):
    """Random token ids (incl. lone UTF-8 fragments): incremental == full decode whenever the latter is clean."""
    import random

    rng = random.Random(0)
    vocab = tokenizer.vocab_size
    special = set(tokenizer.all_special_ids)
    checked = 0
    for _ in range(60):
        ids = [t for t in (rng.randrange(vocab) for _ in range(30)) if t not in special]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if "\ufffd" in full:
            continue
        checked += 1
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), [])
        out = ""
        for t in ids:
            detok.add(t)
            piece = detok.take(final=False)
            assert "\ufffd" not in piece
            out += piece
        out += detok.take(final=True)
        assert out == full
    assert checked > 20
