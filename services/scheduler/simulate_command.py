"""`caraserve simulate`: compare placement policies on a simulated cluster (services/scheduler/simulator.py).

For each request rate of the sweep, one workload (Poisson arrivals, power-law adapter popularity) runs under every
chosen policy; the command prints a table, and writes JSON (`--out`) and two PNG plots: SLO attainment and mean
time per output token versus request rate per policy, and the CDF of time per output token per policy at one
rate. Only argparse and the standard library are imported at module level (the CLI builds its parser from here).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # a source checkout's root (for the results' git commit)
# installed with the package (pyproject's package-data), so the default works without the repository too
DEFAULT_PERF_MODEL = Path(__file__).resolve().parent / "perf_models" / "llama2-7b-gpu-estimate.json"
PAPER_RPS = 340.0


def add_simulate_args(parser: argparse.ArgumentParser) -> None:
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, default=60, metavar="N", help="simulated workers (default: 60)")
    cluster.add_argument("--perf-model", metavar="FILE",
                         help="every worker's performance model, a JSON file as written by `caraserve profile` "
                              "(default: llama2-7b-gpu-estimate.json in services/scheduler/perf_models/, a "
                              "documented estimate for Llama-2-7B on an A10G-class GPU with padded kernels)")
    cluster.add_argument("--max-running", type=int, default=64, metavar="N",
                         help="requests a worker runs at once (default: 64)")
    cluster.add_argument("--kv-tokens", type=int, default=15000, metavar="N",
                         help="a worker's KV-cache room in tokens; each request reserves prompt + max tokens "
                              "(default: 15000, about 8 GB of Llama-2-7B fp16 KV; 0: unlimited)")
    cluster.add_argument("--max-lora-rank", type=int, default=0, metavar="R",
                         help="workers refuse adapters above this rank (default: the highest of --ranks)")
    cluster.add_argument("--gpu-slots", type=int, default=0, metavar="N",
                         help="model an LRU GPU adapter pool of N adapters per worker, loading a missing adapter "
                              "before its prefill (default: 0 = not modelled, adapters start at once as with "
                              "CPU-assisted prefill)")
    cluster.add_argument("--load-ms-per-rank", type=float, default=0.17, metavar="MS",
                         help="adapter load time per rank unit with --gpu-slots (default: 0.17, about 2.1 MB per "
                              "rank of a 7B model's q,k,v,o over a 12 GB/s PCIe link)")
    cluster.add_argument("--slo-factor", type=float, default=1.5, metavar="F",
                         help="SLO on time per output token = F x the model's no-LoRA time per token (default: 1.5)")
    cluster.add_argument("--slo-ms", type=float, metavar="MS", help="an absolute SLO instead of --slo-factor")

    load = parser.add_argument_group("workload")
    load.add_argument("--rps", default=str(int(PAPER_RPS)), metavar="R[,R...]",
                      help="request rate(s) per second over the whole cluster; a list is the sweep of the "
                           "attainment-vs-rate plot (default: 340)")
    load.add_argument("--duration", type=float, default=60.0, metavar="S",
                      help="simulated seconds of arrivals; the cluster then drains (default: 60)")
    load.add_argument("--warmup", type=float, default=10.0, metavar="S",
                      help="requests arriving in the first S seconds run but are not measured (default: 10)")
    load.add_argument("--adapters", type=int, default=40000, metavar="N", help="distinct adapters (default: 40000)")
    load.add_argument("--ranks", default="8,16,32,64", metavar="R,R,...",
                      help="LoRA ranks; each adapter's is drawn uniformly from them (default: 8,16,32,64)")
    load.add_argument("--zipf", type=float, default=1.0, metavar="S",
                      help="adapter popularity exponent: the i-th adapter is drawn with weight 1/i^S "
                           "(default: 1.0; 0: uniform)")
    load.add_argument("--prompt-len", type=float, default=128.0, metavar="MEAN",
                      help="mean prompt tokens (default: 128)")
    load.add_argument("--output-len", type=float, default=64.0, metavar="MEAN",
                      help="mean output tokens (default: 64)")
    load.add_argument("--length-dist", default="lognormal", choices=("lognormal", "exponential", "uniform", "fixed"),
                      help="distribution of prompt and output lengths around their means (default: lognormal)")
    load.add_argument("--length-sigma", type=float, default=0.8, metavar="S",
                      help="sigma of the lognormal length distribution (default: 0.8)")
    load.add_argument("--max-tokens", type=int, default=512, metavar="N",
                      help="every request's max_tokens; outputs are clipped to it (default: 512)")
    load.add_argument("--max-prompt-len", type=int, default=2048, metavar="N",
                      help="prompts are clipped to this (default: 2048)")

    run = parser.add_argument_group("run")
    run.add_argument("--policy", default="all", metavar="NAME[,NAME...]",
                     help="placement policies to compare: all, or a list of rank_aware, random, round_robin, "
                          "most_idle, first_fit (default: all)")
    run.add_argument("--seed", type=int, default=0, help="seed of the workload and the random policy (default: 0)")
    run.add_argument("--out", metavar="FILE", help="write the results as JSON to FILE")
    run.add_argument("--plots", metavar="DIR|PREFIX",
                     help="write PREFIX_slo_vs_rate.png and PREFIX_tpot_cdf.png (a directory: DIR/simulator_...; "
                          "default: beside --out, named after it)")
    run.add_argument("--no-plots", action="store_true", help="write no plots")
    run.add_argument("--cdf-rps", type=float, metavar="R",
                     help="the rate whose time-per-token CDF is plotted (default: 340 if swept, else the highest)")


def _number_list(text: str, flag: str, kind):
    from services.cli import CLIError

    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = kind(part)
        except ValueError:
            raise CLIError(f"{flag} takes a comma-separated list of {kind.__name__}s, got {text!r}") from None
        if not value > 0:
            raise CLIError(f"{flag} values must be positive, got {part}")
        values.append(value)
    return values


def _policies(text: str) -> list[str]:
    from services.cli import CLIError
    from services.scheduler.policies import POLICY_NAMES

    if text.strip() == "all":
        return list(POLICY_NAMES)
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICY_NAMES]
    if unknown or not names:
        raise CLIError(f"unknown policy {', '.join(unknown) or repr(text)}; choose all or from "
                       f"{', '.join(POLICY_NAMES)}")
    return list(dict.fromkeys(names))


def _plot_prefix(args) -> Path | None:
    if args.no_plots:
        return None
    if args.plots:
        p = Path(args.plots)
        if p.is_dir() or args.plots.endswith(("/", "\\")):
            return p / "simulator"
        return p
    if args.out:
        out = Path(args.out)
        return out.with_suffix("") if out.suffix == ".json" else out
    return None


def _git_commit() -> dict:
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return {"commit": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def _machine() -> dict:
    import os
    import platform

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"node": platform.node(), "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "platform": platform.platform(), "python": platform.python_version()}


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def simulate_command(args: argparse.Namespace) -> int:
    import datetime as dt
    import json
    import time

    from services.cli import CLIError
    from services.scheduler.perf_model import PerfModel, PerfModelError

    rates = _number_list(args.rps, "--rps", float)
    ranks = _number_list(args.ranks, "--ranks", int)
    policies = _policies(args.policy)
    perf_path = Path(args.perf_model) if args.perf_model else DEFAULT_PERF_MODEL
    try:
        model = PerfModel.load(perf_path)
    except PerfModelError as exc:
        raise CLIError(str(exc)) from None
    if args.slo_ms is not None and not args.slo_ms > 0:
        raise CLIError(f"--slo-ms must be positive, got {args.slo_ms}")

    import numpy as np

    from services.scheduler.policies import make_policy
    from services.scheduler.simulator import SimConfig, generate_workload, simulate, summarize

    try:
        cfg = SimConfig(workers=args.workers, duration_s=args.duration, warmup_s=args.warmup, adapters=args.adapters,
                        ranks=tuple(ranks), zipf=args.zipf, prompt_len=args.prompt_len, output_len=args.output_len,
                        length_dist=args.length_dist, length_sigma=args.length_sigma, max_tokens=args.max_tokens,
                        max_prompt_len=args.max_prompt_len, max_running=args.max_running, kv_tokens=args.kv_tokens,
                        max_lora_rank=args.max_lora_rank, gpu_slots=args.gpu_slots,
                        load_s_per_rank=args.load_ms_per_rank / 1e3, slo_factor=args.slo_factor, seed=args.seed)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if cfg.worker_max_rank < max(ranks):
        raise CLIError(f"--max-lora-rank {cfg.worker_max_rank} is below the highest of --ranks ({max(ranks)}): "
                       "no worker could serve those adapters")
    slo = args.slo_ms / 1e3 if args.slo_ms is not None else model.default_slo_tpot_s(cfg.slo_factor)
    cdf_rate = args.cdf_rps if args.cdf_rps is not None else (PAPER_RPS if PAPER_RPS in rates else max(rates))
    if cdf_rate not in rates:
        raise CLIError(f"--cdf-rps {cdf_rate:g} is not one of the --rps rates")
    prefix = _plot_prefix(args)

    print(f"simulating {cfg.workers} workers, {len(policies)} policies x {len(rates)} rates, "
          f"{cfg.duration_s:g} s of arrivals each; perf model {perf_path} ({model.form}); "
          f"SLO {slo * 1e3:.2f} ms per token", file=sys.stderr)
    started = time.perf_counter()
    results: dict[str, dict[str, dict]] = {p: {} for p in policies}
    wall: dict[str, dict[str, float]] = {p: {} for p in policies}
    cdf: dict[str, np.ndarray] = {}
    for rate in rates:
        workload = generate_workload(cfg, rate)
        for name in policies:
            res = simulate(cfg, model, make_policy(name, cfg.seed), workload, slo_tpot_s=slo)
            metrics = summarize(res)
            results[name][f"{rate:g}"] = metrics
            wall[name][f"{rate:g}"] = round(res.wall_s, 3)
            if rate == cdf_rate:
                cdf[name] = np.sort(res.tpot()[res.measured()])
            print(f"  {name} @ {rate:g} rps: mean TPOT {_ms(metrics.get('mean_tpot_s'))} ms, p99 "
                  f"{_ms(metrics.get('p99_tpot_s'))} ms, SLO attainment {metrics.get('slo_attainment', 0):.1%} "
                  f"({len(workload)} requests, {res.wall_s:.1f} s)", file=sys.stderr)
    runtime = time.perf_counter() - started

    comparison: dict[str, dict[str, dict]] = {}
    if "rank_aware" in policies:
        for base in policies:
            if base == "rank_aware":
                continue
            comparison[base] = {}
            for key, m in results["rank_aware"].items():
                other = results[base][key].get("mean_tpot_s")
                mine = m.get("mean_tpot_s")
                if other and mine is not None:
                    comparison[base][key] = {"mean_tpot_ratio": mine / other,
                                             "mean_tpot_reduction_pct": 100.0 * (1.0 - mine / other)}

    report = {
        "benchmark": "simulator",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "commit": _git_commit(),
        "runtime_s": runtime,
        "sim_wall_s": wall,  # per policy and rate: seconds the simulation took (the only non-deterministic numbers)
        "config": {**cfg.to_dict(), "rates": rates, "policies": policies, "slo_tpot_s": slo,
                   "slo": f"{args.slo_ms} ms (--slo-ms)" if args.slo_ms is not None
                   else f"{cfg.slo_factor} x no_lora_tpot_s", "cdf_rate": cdf_rate},
        "perf_model_file": _display_path(perf_path),
        "perf_model": model.to_dict(),
        "metrics_note": "TPOT = (finish - arrival) / output tokens, queueing and prefill included; over requests "
                        "arriving in [warmup_s, duration_s); times in seconds",
        "results": results,
        "rank_aware_vs": comparison,
    }
    _print_table(results, comparison, rates)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if prefix is not None:
        for path in _plots(prefix, results, cdf, rates, cdf_rate, slo, model, perf_path):
            print(f"wrote {path}", file=sys.stderr)
    print(f"done in {runtime:.1f} s", file=sys.stderr)
    return 0


def _print_table(results: dict, comparison: dict, rates: list[float]) -> None:
    print(f"{'policy':<12} {'rps':>6} {'mean TPOT ms':>13} {'p99 TPOT ms':>12} {'SLO att.':>9} {'mean TTFT ms':>13}")
    for name, by_rate in results.items():
        for rate in rates:
            m = by_rate[f"{rate:g}"]
            if not m.get("requests"):
                print(f"{name:<12} {rate:>6g}   (no requests measured)")
                continue
            print(f"{name:<12} {rate:>6g} {m['mean_tpot_s'] * 1e3:>13.2f} {m['p99_tpot_s'] * 1e3:>12.2f} "
                  f"{m['slo_attainment']:>9.1%} {m['mean_ttft_s'] * 1e3:>13.1f}")
    for base, by_rate in comparison.items():
        cells = ", ".join(f"{k} rps {v['mean_tpot_reduction_pct']:+.1f}%" for k, v in by_rate.items())
        print(f"rank_aware mean TPOT lower than {base} by: {cells}")


def _plots(prefix: Path, results: dict, cdf: dict, rates: list[float], cdf_rate: float, slo: float, model,
           perf_path: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    import numpy as np

    prefix.parent.mkdir(parents=True, exist_ok=True)
    label = f"perf model {perf_path.name} ({model.form})"
    written = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_rate in results.items():
        xs = [r for r in rates if by_rate[f"{r:g}"].get("requests")]
        ax1.plot(xs, [100 * by_rate[f"{r:g}"]["slo_attainment"] for r in xs], marker="o", label=name)
        ax2.plot(xs, [1e3 * by_rate[f"{r:g}"]["mean_tpot_s"] for r in xs], marker="o", label=name)
    ax1.axhline(99, color="grey", linestyle=":", linewidth=1)
    ax1.set_xlabel("request rate (req/s)")
    ax1.set_ylabel(f"SLO attainment (%), TPOT <= {slo * 1e3:.1f} ms")
    ax1.set_title("SLO attainment vs request rate")
    ax2.axhline(slo * 1e3, color="grey", linestyle=":", linewidth=1)
    ax2.set_xlabel("request rate (req/s)")
    ax2.set_ylabel("mean time per output token (ms)")
    ax2.set_title("mean TPOT vs request rate")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"simulated cluster; {label}", fontsize=9)
    fig.tight_layout()
    path = Path(f"{prefix}_slo_vs_rate.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, values in cdf.items():
        if len(values):
            ax.plot(values * 1e3, np.arange(1, len(values) + 1) / len(values), label=name)
    ax.axvline(slo * 1e3, color="grey", linestyle=":", linewidth=1, label="SLO")
    tails = [np.percentile(v, 99.5) for v in cdf.values() if len(v)]
    if tails:  # the far tail squeezes the curves; the table and JSON hold p99
        low = min(float(v[0]) for v in cdf.values() if len(v))
        ax.set_xlim(0.9e3 * min(low, slo), 1.1e3 * max(max(tails), slo))
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TPOT CDF at {cdf_rate:g} req/s; {label}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(f"{prefix}_tpot_cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
