"""Request state inside the engine: sampling parameters, the sequence's tokens and lifecycle, and outputs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN != NaN


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message is one line for the client."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Checked in `__post_init__`; bad values raise SamplingParamsError."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    top_k: int = -1  # -1 (or 0) means no top-k cut
    seed: int | None = None  # per-request RNG seed: same seed, same tokens
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop token ids (EOS always stops)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: bool = False  # return the chosen token's logprob for each generated token
    top_logprobs: int = 0  # also return this many most likely alternatives per token (0-20)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamsError(f"temperature must be a number between 0 and 2, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingParamsError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop must be a non-empty string or a list of at most 16 non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids must be a list of integers")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= 20:
            raise SamplingParamsError(f"top_logprobs must be an integer between 0 and 20, got {self.top_logprobs!r}")
        if self.top_logprobs:
            self.logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # aborted by the caller


class SequenceStatus(enum.IntEnum):
    """Lifecycle, in order: WAITING -> RUNNING -> FINISHED (a preempted sequence goes back to WAITING)."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class TokenLogprob:
    """One generated token with its logprob and, if asked, the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """What one `step()` reports for one request: the tokens and text added since the last report."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # detokenized text added this step (never ends in a broken UTF-8 sequence)
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when SamplingParams.logprobs
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, in total


class Sequence:
    """One request inside the engine. Token bookkeeping only; the scheduler and runner move it along."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: str | None,
        arrival: int,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.adapter = adapter  # adapter name, None for the base model
        self.arrival = arrival  # monotonically increasing admission number (FCFS order)
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt then generated tokens
        self.num_computed = 0  # tokens whose KV is in the cache
        self.block_table: list[int] = []  # KV block ids, in order
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.adapter_slot: int | None = None  # resident adapter slot while scheduled
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def in_prefill(self) -> bool:
        """True while some tokens other than the last sampled one still lack KV."""
        return self.num_computed < self.num_tokens - 1 or self.num_generated == 0
