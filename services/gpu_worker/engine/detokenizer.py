"""Incremental detokenization with stop strings; never emits half of a UTF-8 character.

Text is decoded from a window of tokens that starts a few tokens back (so tokenizers that render a leading space
from context decode right) and is held while it ends in U+FFFD (an incomplete byte sequence). Text that could still
turn out to be the start of a stop string is held back until it cannot.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far (stop string excluded)
        self.emitted = 0  # characters of `text` already reported

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Feed one generated token; True if a stop string was found (text is then cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        search_from = max(0, len(self.text) - self.holdback)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [at for s in self.stop if (at := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take(self, final: bool) -> str:
        """Text not reported yet; while not final, the tail that may begin a stop string stays held."""
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
