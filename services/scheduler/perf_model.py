"""A worker's performance model: predicted decode-step and prefill times from batch composition (DESIGN.md,
"Rank-aware scheduling").

Decode step over a batch S of running requests with LoRA ranks r_i (0 for the base model):

    form "max_rank" (padded kernels, BGMV-style):   Dec(S) = β + γ·|S| + α·|S|·max_i r_i
    form "sum_rank" (unpadded kernels, ours):        Dec(S) = β + γ·|S| + α·Σ_i r_i

γ·|S| is the base model's per-sequence cost (attention, sampling), which the paper folds into β; it matters on
CPUs and at large batches. Prefill of a set of requests (n_i prompt tokens, rank r_i), run as one batch:

    Pre(Q) = π₀ + Σ_i (π₁·n_i + π₂·n_i·r_i)        (0 for an empty set)

`fit_perf_model` fits both decode forms by least squares on profiled samples and keeps the one with the higher R²
(the one that describes the kernels in use), reporting both. Pure Python + numpy: the scheduler, the simulator and
the profiler share it, and workers publish it (as `to_dict()`) in their heartbeats.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMS = ("max_rank", "sum_rank")
FORMAT_VERSION = 1


class PerfModelError(ValueError):
    """A model file or dict that cannot be used (the message says why)."""


@dataclass
class DecodeSample:
    ranks: list[int]  # LoRA rank of each sequence in the batch (0: base model)
    seconds: float  # measured step time


@dataclass
class PrefillSample:
    tokens: int  # prompt tokens prefilled in the step
    rank: int  # the adapter's rank (0: base model)
    seconds: float


@dataclass
class PerfModel:
    form: str  # "max_rank" or "sum_rank": which decode form the coefficients belong to
    decode_base_s: float  # β
    decode_per_seq_s: float  # γ
    decode_per_rank_s: float  # α (per rank unit of the form's rank term)
    prefill_base_s: float  # π₀
    prefill_per_token_s: float  # π₁
    prefill_per_token_rank_s: float  # π₂
    no_lora_tpot_s: float  # measured time per output token without LoRA (batch 1, prefill included): the SLO base
    r2: dict[str, float] = field(default_factory=dict)  # {"max_rank": R², "sum_rank": R², "prefill": R²}
    device: str = "cpu"  # where it was measured
    lora_backend: str = ""  # kernels in use when measured ("torch", "triton")
    samples: int = 0  # decode + prefill samples the fit used
    created: float = 0.0  # time.time() of the fit
    source: str = ""  # where the numbers come from (e.g. "caraserve profile on <host>", or a documented estimate)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise PerfModelError(f"form must be one of {FORMS}, got {self.form!r}")
        for name in ("decode_base_s", "decode_per_seq_s", "decode_per_rank_s", "prefill_base_s",
                     "prefill_per_token_s", "prefill_per_token_rank_s", "no_lora_tpot_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise PerfModelError(f"{name} must be a finite number, got {value!r}")
        if self.no_lora_tpot_s <= 0:
            raise PerfModelError(f"no_lora_tpot_s must be positive, got {self.no_lora_tpot_s}")

    # ---- predictions ---------------------------------------------------------------------------------------------
    def rank_term(self, ranks: list[int]) -> float:
        if not ranks:
            return 0.0
        return float(len(ranks) * max(ranks)) if self.form == "max_rank" else float(sum(ranks))

    def decode_step_s(self, ranks: list[int]) -> float:
        """Predicted time of one decode step over sequences of these ranks (0 for an empty batch)."""
        if not ranks:
            return 0.0
        t = self.decode_base_s + self.decode_per_seq_s * len(ranks) + self.decode_per_rank_s * self.rank_term(ranks)
        return max(t, 0.0)

    def prefill_s(self, prompts: list[tuple[int, int]]) -> float:
        """Predicted time to prefill requests given as (prompt tokens, rank) in one batch (0 for none)."""
        if not prompts:
            return 0.0
        t = self.prefill_base_s + sum(self.prefill_per_token_s * n + self.prefill_per_token_rank_s * n * r
                                      for n, r in prompts)
        return max(t, 0.0)

    def default_slo_tpot_s(self, factor: float = 1.5) -> float:
        """The default SLO on time per output token: factor × the measured no-LoRA time per token."""
        return factor * self.no_lora_tpot_s

    # ---- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> PerfModel:
        if not isinstance(data, dict):
            raise PerfModelError(f"a performance model is a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise PerfModelError(f"performance model format {version} is not supported (this is {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise PerfModelError(f"unknown performance model fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PerfModelError(f"bad performance model: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PerfModel:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PerfModelError(f"no performance model file at {path}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise PerfModelError(f"cannot read performance model {path}: {exc}") from None
        return cls.from_dict(data)


def _lstsq(rows: list[list[float]], y: list[float]) -> tuple[np.ndarray, float]:
    """Least-squares coefficients (clamped at >= 0: costs do not shrink with work) and R²."""
    a = np.asarray(rows, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    if (coef < 0).any():  # refit without the negative terms (a tiny non-negative least squares)
        keep = coef >= 0
        coef = np.zeros_like(coef)
        if keep.any():
            coef[keep] = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
            coef = np.maximum(coef, 0.0)
    pred = a @ coef
    ss_res = float(((b - pred) ** 2).sum())
    ss_tot = float(((b - b.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return coef, r2


def fit_perf_model(
    decode: list[DecodeSample],
    prefill: list[PrefillSample],
    no_lora_tpot_s: float,
    *,
    form: str | None = None,
    device: str = "cpu",
    lora_backend: str = "",
    source: str = "",
) -> PerfModel:
    """Fit both decode forms (keep `form`, or the better fit) and the prefill model to profiled samples."""
    if len(decode) < 3 or len(prefill) < 3:
        raise PerfModelError(f"need at least 3 decode and 3 prefill samples, got {len(decode)} and {len(prefill)}")
    if form is not None and form not in FORMS:
        raise PerfModelError(f"form must be one of {FORMS}, got {form!r}")
    fits = {}
    for f in FORMS:
        rows = []
        for s in decode:
            term = len(s.ranks) * max(s.ranks, default=0) if f == "max_rank" else sum(s.ranks)
            rows.append([1.0, float(len(s.ranks)), float(term)])
        fits[f] = _lstsq(rows, [s.seconds for s in decode])
    chosen = form or max(FORMS, key=lambda f: fits[f][1])
    (beta, gamma, alpha), _ = fits[chosen]
    pre_coef, pre_r2 = _lstsq([[1.0, float(s.tokens), float(s.tokens * s.rank)] for s in prefill],
                              [s.seconds for s in prefill])
    return PerfModel(
        form=chosen,
        decode_base_s=float(beta), decode_per_seq_s=float(gamma), decode_per_rank_s=float(alpha),
        prefill_base_s=float(pre_coef[0]), prefill_per_token_s=float(pre_coef[1]),
        prefill_per_token_rank_s=float(pre_coef[2]),
        no_lora_tpot_s=float(no_lora_tpot_s),
        r2={"max_rank": round(fits["max_rank"][1], 4), "sum_rank": round(fits["sum_rank"][1], 4),
            "prefill": round(pre_r2, 4)},
        device=device, lora_backend=lora_backend, samples=len(decode) + len(prefill), created=time.time(),
        source=source,
    )
