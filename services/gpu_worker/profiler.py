"""`caraserve profile`: measure an engine's decode-step and prefill times and fit the scheduler's performance model.

The profiler drives the real engine (the kernels, attention and sampler in use) with random in-memory adapters of
the ranks asked for:

- decode: for each batch size B and rank mix (no LoRA, every sequence at rank r, ranks cycled, one high rank among
  low ones), B requests are prefilled, then `repeats` single decode steps are timed (median);
- prefill: for each prompt length n and rank (0 and each r), the step that prefills one request is timed;
- no-LoRA time per token: one base-model request (64-token prompt, 32 tokens) end to end, divided by its tokens —
  the base of the default SLO (services/scheduler/perf_model.py).

`fit_perf_model` then fits both decode forms (batch × max rank, sum of ranks) and keeps the better. A gpu_worker
without a model file runs the `quick` profile at start-up and caches it under the data directory
(`default_model_path`), so later starts load it.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.scheduler.perf_model import DecodeSample, PerfModel, PerfModelError, PrefillSample, fit_perf_model
from shared.adapters import LORA_TARGETS, LoRAAdapter, LoRAModuleWeights

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "caraserve-profile-r"
POOR_FIT_R2 = 0.8  # below this `caraserve profile` warns that the machine was probably busy


@dataclass
class ProfileSettings:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    prompt_lengths: tuple[int, ...] = (16, 64, 128, 256)
    repeats: int = 5

    @classmethod
    def quick(cls) -> ProfileSettings:
        """What a worker runs at start-up without a model file: a few seconds on a CPU."""
        return cls(batch_sizes=(1, 4, 8), ranks=(8, 64), prompt_lengths=(32, 128), repeats=3)

    def fitted_to(self, engine) -> ProfileSettings:
        """These settings within the engine's limits (ranks <= max_lora_rank, batches <= max_num_seqs, ...)."""
        c = engine.config
        ranks = tuple(r for r in self.ranks if r <= c.max_lora_rank)[: c.max_loras]
        batches = tuple(b for b in self.batch_sizes if b <= c.max_num_seqs)
        lengths = tuple(n for n in self.prompt_lengths if n < engine.max_model_len - 1)
        if not ranks or not batches or not lengths:
            raise PerfModelError(f"nothing to profile within the engine's limits (max_lora_rank {c.max_lora_rank}, "
                                 f"max_num_seqs {c.max_num_seqs}, max_model_len {engine.max_model_len})")
        return ProfileSettings(batches, ranks, lengths, self.repeats)

    def decode_mixes(self) -> list[list[int]]:
        """Rank lists to time, one per decode point."""
        mixes = []
        lo, hi = min(self.ranks), max(self.ranks)
        for b in self.batch_sizes:
            mixes.append([0] * b)
            mixes.extend([r] * b for r in self.ranks)
            if b >= 2:
                mixes.append([self.ranks[i % len(self.ranks)] for i in range(b)])  # ranks cycled
                mixes.append([hi] + [lo] * (b - 1))  # one high rank among low ones: the forms disagree most here
        unique = []
        for m in mixes:
            if m not in unique:
                unique.append(m)
        return unique


def random_adapter(engine, rank: int, seed: int = 0, name: str | None = None) -> LoRAAdapter:
    """An in-memory adapter of `rank` on every LoRA target of every layer, random A and B (timing only); named
    `name`, by default the profiler's name for its rank."""
    shape = engine.base_shape
    g = torch.Generator().manual_seed(seed)
    modules = []
    for layer in range(shape.num_layers):
        for target in LORA_TARGETS:
            fan_in, fan_out = shape.module_shapes[target]
            a = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=g) * 0.01
            modules.append(LoRAModuleWeights(layer, target, a.contiguous(), b.contiguous(), 2.0))
    name = name or f"{ADAPTER_PREFIX}{rank}"
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGETS)}
    return LoRAAdapter(name, Path("<random>"), config, modules)


class _Profiler:
    def __init__(self, engine, settings: ProfileSettings) -> None:
        from services.gpu_worker.engine.sequence import SamplingParams

        self.engine = engine
        self.s = settings
        self.sampling = SamplingParams
        self.vocab = engine.hf_config.vocab_size
        self.ids = itertools.count()
        self.added: list[str] = []  # request ids added since the last drain
        self.device = engine.config.torch_device()

    def prompt(self, n: int, salt: int) -> list[int]:
        return [(37 * i + 101 * salt) % (self.vocab - 200) + 100 for i in range(n)]

    def adapter(self, rank: int) -> str | None:
        return None if rank == 0 else f"{ADAPTER_PREFIX}{rank}"

    def _step(self) -> tuple[float, list]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        outputs = self.engine.step()  # sampled tokens come back to the host: the step has finished on the device
        return time.perf_counter() - start, outputs

    def _add(self, prompt: list[int], max_tokens: int, rank: int) -> str:
        rid = f"profile-{next(self.ids)}"
        self.engine.add_request(rid, prompt, self.sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                adapter=self.adapter(rank))
        self.added.append(rid)
        return rid

    def _drain(self) -> None:
        """Abort what the profiler added that is still running (finished ones are no-ops) and flush the engine."""
        for rid in self.added:
            self.engine.abort(rid)
        self.added.clear()
        while self.engine.has_unfinished():
            self.engine.step()

    def decode(self, ranks: list[int]) -> DecodeSample:
        steps = self.s.repeats
        rids = [self._add(self.prompt(8, i), steps + 4, r) for i, r in enumerate(ranks)]
        started: set[str] = set()
        for _ in range(64):  # prefill every sequence (one step unless the batch exceeds the token budget)
            _, outputs = self._step()
            started.update(o.request_id for o in outputs)
            if started >= set(rids):
                break
        if len(self.engine.scheduler.running) != len(ranks):
            self._drain()
            raise PerfModelError(f"could not run a batch of {len(ranks)} (KV cache too small?)")
        times = [self._step()[0] for _ in range(steps)]
        self._drain()
        return DecodeSample(list(ranks), statistics.median(times))

    def _time_request(self, prompt: list[int], max_tokens: int, rank: int) -> float:
        """Seconds of engine steps until one request (alone on the engine) finishes."""
        rid = self._add(prompt, max_tokens, rank)
        total = 0.0
        while self.engine.has_unfinished():
            dt, outputs = self._step()
            total += dt
            if any(o.request_id == rid and o.finished for o in outputs):
                break
        self._drain()
        return total

    def prefill(self, n: int, rank: int) -> PrefillSample:
        """The step(s) that prefill one n-token prompt (and sample its only token)."""
        times = [self._time_request(self.prompt(n, rep), 1, rank) for rep in range(self.s.repeats)]
        return PrefillSample(n, rank, statistics.median(times))

    def no_lora_tpot(self, prompt: int = 64, tokens: int = 32) -> float:
        """A base-model request end to end, per output token (prefill included)."""
        runs = max(2, self.s.repeats // 2)
        return statistics.median(self._time_request(self.prompt(prompt, rep), tokens, 0) / tokens
                                 for rep in range(runs))


class ProfilingCancelled(Exception):
    """should_stop() said so between two points: the engine is left as it was, nothing is written."""


def profile_engine(engine, settings: ProfileSettings | None = None, *, show_progress: bool = True,
                   source: str | None = None, should_stop: Callable[[], bool] | None = None) -> PerfModel:
    """Measure `engine` (idle: it must run nothing else meanwhile) and return its fitted PerfModel. `should_stop`
    is asked before every point (a worker told to stop while it profiles at start-up); ProfilingCancelled if true."""

    def point_done() -> None:
        bar.update(1)
        if should_stop is not None and should_stop():
            raise ProfilingCancelled("profiling stopped before it finished")

    from tqdm import tqdm

    s = (settings or ProfileSettings()).fitted_to(engine)
    if engine.has_unfinished():
        raise PerfModelError("the engine is busy: profile it before it serves requests")
    added = []
    for rank in s.ranks:
        name = f"{ADAPTER_PREFIX}{rank}"
        if name not in engine.adapters.registered:
            engine.register_adapter(random_adapter(engine, rank, seed=rank))
            added.append(name)
    prof = _Profiler(engine, s)
    mixes = s.decode_mixes()
    prefill_points = [(n, r) for n in s.prompt_lengths for r in (0, *s.ranks)]
    bar = tqdm(total=len(mixes) + len(prefill_points) + 2, desc="profiling", unit="point", file=sys.stderr,
               disable=not show_progress or None, leave=False)
    started = time.perf_counter()
    try:
        # no_grad, not inference_mode: state the engine creates during these steps (the CPU's bagged LoRA pools) is
        # kept and written by later steps, which run outside inference mode, and may not be an inference tensor
        with torch.no_grad():
            prof.decode([0])  # warm-up: first steps are slow (allocations, kernel compilation)
            prof.prefill(s.prompt_lengths[0], max(s.ranks))
            point_done()
            decode = []
            for mix in mixes:
                decode.append(prof.decode(mix))
                point_done()
            prefill = []
            for n, r in prefill_points:
                prefill.append(prof.prefill(n, r))
                point_done()
            tpot = prof.no_lora_tpot()
            bar.update(1)
    finally:
        bar.close()
        prof._drain()
        for name in added:
            engine.unload_adapter(name)
        engine.step()  # let the unloads take effect
    model = fit_perf_model(
        decode, prefill, tpot, device=str(engine.config.torch_device()), lora_backend=engine.lora_backend,
        source=source or f"caraserve profile of {engine.model_name} on {socket.gethostname()} "
                         f"({time.perf_counter() - started:.0f} s, {len(decode)} decode + {len(prefill)} prefill points)",
    )
    return model


def default_model_path(engine, data_dir: str | None = None) -> Path:
    """Where a worker looks for (and caches) its model: one file per model, device, dtype, kernels (LoRA and base
    linear layers) and host."""
    from shared.paths import data_dir as resolve_data_dir

    c = engine.config
    parts = [engine.model_name, str(c.torch_device()).replace(":", ""), str(c.torch_dtype()).removeprefix("torch."),
             engine.lora_backend + ("-bagged" if getattr(engine.model.lora_backend, "bagged", None) else ""),
             engine.model.linear_kernels, f"seqs{c.max_num_seqs}", socket.gethostname()]
    slug = "-".join(p.replace("/", "_") for p in parts)
    return resolve_data_dir(data_dir) / "perf_models" / f"{slug}.json"


def describe(model: PerfModel) -> str:
    """One line for logs: the form kept, both R², the no-LoRA time per token."""
    r2 = model.r2
    return (f"decode = {model.decode_base_s * 1e3:.2f} ms + {model.decode_per_seq_s * 1e3:.3f} ms/seq + "
            f"{model.decode_per_rank_s * 1e6:.3f} us x {'batch x max rank' if model.form == 'max_rank' else 'sum of ranks'}"
            f" (R² {r2.get(model.form, float('nan')):.3f}; other form "
            f"{r2.get('sum_rank' if model.form == 'max_rank' else 'max_rank', float('nan')):.3f}), prefill R² "
            f"{r2.get('prefill', float('nan')):.3f}, no-LoRA time per token {model.no_lora_tpot_s * 1e3:.1f} ms")


def poor_fit_warning(model: PerfModel) -> str | None:
    """A sentence when the fit is poor (the timings were noisy), else None."""
    worst = min(model.r2.get(model.form, 0.0), model.r2.get("prefill", 0.0))
    if worst >= POOR_FIT_R2:
        return None
    return (f"the fit is poor (R² {worst:.2f} < {POOR_FIT_R2}): the timings were noisy (was something else running?) "
            "or do not follow the linear model (small CPU batches often do not). "
            "Profile again on an idle machine (caraserve profile), or with more --repeats")


def load_or_profile(engine, path: str | None, data_dir: str | None = None,
                    should_stop: Callable[[], bool] | None = None) -> PerfModel:
    """The worker's model: from `path` (must exist), else the cached default, else a quick profile (cached;
    ProfilingCancelled when should_stop() turns true meanwhile)."""
    if path:
        model = PerfModel.load(path)
        log.info("performance model from %s: %s", path, describe(model))
        return model
    cached = default_model_path(engine, data_dir)
    with _profiling_lock(cached, should_stop):
        if cached.exists():
            try:
                model = PerfModel.load(cached)
                log.info("performance model from %s: %s", cached, describe(model))
                return model
            except PerfModelError as exc:
                log.warning("ignoring %s: %s", cached, exc)
        print("no performance model for this worker yet: profiling it briefly (once; cached in "
              f"{cached})", file=sys.stderr)
        model = profile_engine(engine, ProfileSettings.quick(), should_stop=should_stop)
        model.save(cached)
    log.info("profiled: %s", describe(model))
    warning = poor_fit_warning(model)
    if warning:
        log.warning("%s; delete %s to profile again at the next start", warning, cached)
    return model


@contextlib.contextmanager
def _profiling_lock(cached: Path, should_stop: Callable[[], bool] | None):
    """Hold an exclusive lock beside the cached model file: workers of one machine starting together (`caraserve up
    --workers N`) profile one at a time, so the first measures an otherwise idle machine and writes the file, the
    others wait for it and load it (workers profiling side by side each measured the others' load: fits of R² 0.1).
    The OS releases the lock of a worker that dies. ProfilingCancelled if should_stop() turns true while waiting."""
    import fcntl

    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.with_name(cached.name + ".lock"), "a") as lock:
        waited = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("another worker of this machine is profiling; waiting for its model (%s)", cached)
                    waited = True
                if should_stop is not None and should_stop():
                    raise ProfilingCancelled("stopped while waiting for another worker's profile") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    from services.cli import CLIError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{flag} must list positive integers, got {text!r}")
    return values


def profile_command(args) -> int:
    """`caraserve profile`."""
    from services.cli import CLIError
    from services.gpu_worker.run_batch import build_engine

    base = ProfileSettings.quick() if args.quick else ProfileSettings()
    settings = ProfileSettings(
        batch_sizes=_int_list(args.batch_sizes, "--batch-sizes") or base.batch_sizes,
        ranks=_int_list(args.ranks, "--ranks") or base.ranks,
        prompt_lengths=_int_list(args.prompt_lengths, "--prompt-lengths") or base.prompt_lengths,
        repeats=args.repeats or base.repeats,
    )
    if args.repeats is not None and args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    engine = build_engine(args)
    try:
        out = Path(args.output) if args.output else default_model_path(engine, args.data_dir)
        try:
            model = profile_engine(engine, settings)
        except PerfModelError as exc:
            raise CLIError(str(exc)) from None
        model.save(out)
    finally:
        engine.close()
    print(describe(model), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    warning = poor_fit_warning(model)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
