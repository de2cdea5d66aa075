#!/usr/bin/env python
"""Mesh overhead: time to first token and tokens/s through the gateway versus the engine called in-process.

Two systems serve the same requests in one run, on the same machine, with the same engine settings:

  mesh        real processes: embedded nats-server, scheduler, gpu_worker and gateway (`caraserve serve ...`);
              the client streams /v1/completions over HTTP (SSE) with aiohttp.
  in_process  an LLMEngine in this process: add_request, then step() until the request's first token.

TTFT: requests one at a time (nothing else running), alternating mesh / in-process request by request so slow
drift of the machine hits both alike. TTFT is from sending (HTTP POST / add_request) to the first token (first
SSE chunk / first step output with a token). A request's engine steps vary by several ms from one to the next on a
busy CPU, more than the target, so each TTFT is split into its engine time and the rest: in-process, the duration
of the engine.step() calls until the first token; through the mesh, the worker's engine time since it admitted
the request, which the gateway sends in the Server-Timing header (TokenChunk.engine_s). The overhead of each
system is TTFT minus engine time; the added TTFT is the mesh's overhead p50 minus the in-process one's (also
reported: the raw TTFT p50s, their difference, and the paired differences). DESIGN.md target: added p50 <= 2 ms.
For scale, the transport floor, measured the same way (after each in-process request, so with every process idle
as long as before a measured request): the HTTP floor, a GET /healthz round trip answered by the gateway alone (no
NATS), and the NATS floor, a round trip through nats-server to a process that only echoes. A mesh request pays one
HTTP round trip plus three one-way NATS hops (gateway -> scheduler -> worker -> gateway), i.e. 1.5 NATS round trips,
before any of our code runs: floor = HTTP + 1.5 x NATS (p50s); `added_beyond_floor_p50` is what our services add.
Throughput: --concurrency requests of --max-tokens tokens each (ignore_eos, greedy) at once through each system;
tokens/s and the ratio mesh / in-process. Greedy outputs are compared between the systems (agreement).

Output: JSON (default bench/results/mesh_overhead.json) with machine, git commit, config, both systems' numbers
and the ratios; a PNG beside it (TTFT distributions) when matplotlib is installed. Progress on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine_info, progress, summarize, timestamp, write_result  # noqa: E402

API_KEY = "bench-key"
PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "List three prime numbers:",
    "Explain photosynthesis in one sentence.", "Once upon a time, in a small village,",
    "The quick brown fox", "def fibonacci(n):", "A good breakfast includes",
]


# The NATS floor's far end: a process that answers every message on `echo` with its payload, nothing else.
ECHO_SCRIPT = """
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    async def answer(msg):
        await nc.publish(msg.reply, msg.data)
    await nc.subscribe("bench.echo", cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def start_echo(nats_url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SCRIPT, nats_url], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("the NATS echo process did not start")
    return proc


def start_mesh(model_path: str, workdir: Path):
    """nats-server + scheduler + gpu_worker + gateway as separate processes; returns (nats, procs, base_url)."""
    from shared.nats_server import EmbeddedNatsServer, free_port

    nats = EmbeddedNatsServer(workdir / "nats", port=0).start()
    port = free_port()
    env = {**os.environ, "CARASERVE_NATS_URL": nats.url, "CARASERVE_API_KEY": API_KEY, "CARASERVE_PORT": str(port),
           "CARASERVE_LOG_LEVEL": "warning", "CARASERVE_WORKER_ID": "bench-worker"}
    procs = []
    for service, extra in (("scheduler", []), ("gpu_worker", ["--model", model_path]), ("gateway", [])):
        procs.append(subprocess.Popen([sys.executable, "-m", "services.cli", "serve", service, *extra], env=env,
                                      stdin=subprocess.DEVNULL))
    return nats, procs, f"http://127.0.0.1:{port}"


def stop_mesh(nats, procs) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    nats.stop()


async def wait_ready(base_url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base_url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("the mesh did not become ready")


def engine_ms(server_timing: str) -> float:
    """The `engine` metric's duration (ms) in a Server-Timing header."""
    for metric in server_timing.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        if name == "engine":
            return next(float(p[4:]) for p in params if p.startswith("dur="))
    raise ValueError(f"no engine metric in Server-Timing: {server_timing!r}")


async def mesh_request(http, base_url, model, prompt, max_tokens,
                       ignore_eos=False) -> tuple[float, float, str, int, float]:
    """One streamed completion -> (ttft_s, total_s, text, completion_tokens, engine_s until the first token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, tokens = None, [], 0
    async with http.post(f"{base_url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"mesh answered {resp.status}: {await resp.text()}")
        engine_s = engine_ms(resp.headers["Server-Timing"]) / 1000
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if line == b"data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("choices"):
                text.append(event["choices"][0]["text"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft, time.perf_counter() - t0, "".join(text), tokens, engine_s


def engine_request(engine, prompt, max_tokens, request_id) -> tuple[float, float, str, float]:
    """One request in-process -> (ttft_s, total_s, text, engine_s: its step() durations until the first token)."""
    from services.gpu_worker.engine.sequence import SamplingParams

    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    ttft, text, engine_s = None, [], 0.0
    while engine.has_unfinished():
        t_step = time.perf_counter()
        outputs = engine.step()
        if ttft is None:
            engine_s += time.perf_counter() - t_step
        for out in outputs:
            if ttft is None and out.new_token_ids:
                ttft = time.perf_counter() - t0
            text.append(out.new_text)
    return ttft, time.perf_counter() - t0, "".join(text), engine_s


def engine_batch(engine, prompts, max_tokens) -> tuple[float, int, list[str]]:
    from services.gpu_worker.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(r.token_ids) for r in results), [r.text for r in results]


async def run(args) -> dict:
    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.kernel_warmup import warm_up_if_compiled
    from shared.model_provisioning import resolve_model

    model_path = str(resolve_model(args.model).path)
    workdir = Path(tempfile.mkdtemp(prefix="caraserve-bench-"))
    progress("mesh", "starting nats-server, scheduler, gpu_worker, gateway")
    nats, procs, base_url = start_mesh(model_path, workdir)
    echo_nc = None
    try:
        import nats as nats_py

        procs.append(start_echo(nats.url))
        echo_nc = await nats_py.connect(nats.url)
        progress("in_process", "loading the engine")
        engine = LLMEngine(EngineConfig(model=model_path))
        warm_up_if_compiled(engine, report=lambda line: progress("in_process", line))  # as the worker does
        model = engine.model_name
        await wait_ready(base_url)
        progress("mesh", f"ready at {base_url}")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            for prompt in PROMPTS[:2]:  # warm-up, not measured
                await mesh_request(http, base_url, model, prompt, 2)
                engine_request(engine, prompt, 2, f"warm-{prompt}")
            ttft = {"mesh": [], "in_process": []}
            engine_time = {"mesh": [], "in_process": []}
            http_floor, nats_floor = [], []
            agree = 0
            for i in range(args.requests):
                prompt = PROMPTS[i % len(PROMPTS)]
                m_ttft, _, m_text, _, m_engine = await mesh_request(http, base_url, model, prompt, args.ttft_tokens)
                e_ttft, _, e_text, e_engine = engine_request(engine, prompt, args.ttft_tokens, f"ttft-{i}")
                t0 = time.perf_counter()
                async with http.get(f"{base_url}/healthz") as resp:
                    await resp.read()
                http_floor.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                await echo_nc.request("bench.echo", prompt.encode() * 16, timeout=5)
                nats_floor.append((time.perf_counter() - t0) * 1000)
                ttft["mesh"].append(m_ttft)
                ttft["in_process"].append(e_ttft)
                engine_time["mesh"].append(m_engine)
                engine_time["in_process"].append(e_engine)
                agree += m_text == e_text
                if (i + 1) % 10 == 0:
                    progress("ttft", f"{i + 1}/{args.requests}")
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
            progress("throughput", f"{args.concurrency} concurrent x {args.max_tokens} tokens through the mesh")
            t0 = time.perf_counter()
            results = await asyncio.gather(*(mesh_request(http, base_url, model, p, args.max_tokens, ignore_eos=True)
                                             for p in prompts))
            mesh_wall = time.perf_counter() - t0
            mesh_tokens = sum(r[3] for r in results)
            progress("throughput", "the same in-process")
            engine_wall, engine_tokens, engine_texts = engine_batch(engine, prompts, args.max_tokens)
    finally:
        if echo_nc is not None:
            await echo_nc.close()
        stop_mesh(nats, procs)
    ms = {k: [v * 1000 for v in vals] for k, vals in ttft.items()}
    overhead = {k: [1000 * (t - e) for t, e in zip(ttft[k], engine_time[k])] for k in ttft}
    overhead_summary = {k: summarize(v) for k, v in overhead.items()}
    added_p50 = overhead_summary["mesh"]["p50"] - overhead_summary["in_process"]["p50"]
    diffs = [m - e for m, e in zip(ms["mesh"], ms["in_process"])]
    summary_mesh, summary_engine = summarize(ms["mesh"]), summarize(ms["in_process"])
    http_summary, nats_summary = summarize(http_floor), summarize(nats_floor)
    floor_p50 = http_summary["p50"] + 1.5 * nats_summary["p50"]
    mesh_tps, engine_tps = mesh_tokens / mesh_wall, engine_tokens / engine_wall
    return {
        "benchmark": "mesh_overhead",
        "timestamp": timestamp(),
        "machine": machine_info(),
        "commit": git_commit(),
        "config": {"model": model, "requests": args.requests, "ttft_tokens": args.ttft_tokens,
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens, "engine": "EngineConfig defaults"},
        "ttft_ms": {"mesh": summary_mesh, "in_process": summary_engine, "paired_difference": summarize(diffs),
                    "raw_added_p50": summary_mesh["p50"] - summary_engine["p50"],
                    "engine": {k: summarize([1000 * e for e in v]) for k, v in engine_time.items()},
                    "overhead": overhead_summary,
                    "added_p50": added_p50, "target_added_p50": 2.0, "target_met": added_p50 <= 2.0,
                    "http_floor": http_summary, "nats_round_trip_floor": nats_summary,
                    "transport_floor_p50": floor_p50, "added_beyond_floor_p50": added_p50 - floor_p50},
        "throughput": {"mesh_tokens_per_s": mesh_tps, "in_process_tokens_per_s": engine_tps,
                       "ratio_mesh_over_in_process": mesh_tps / engine_tps,
                       "mesh_tokens": mesh_tokens, "in_process_tokens": engine_tokens},
        "greedy_agreement": {"ttft_requests": agree / args.requests,
                             "throughput_requests": sum(r[2] == t for r, t in zip(results, engine_texts)) / len(prompts)},
        "samples_ms": ms,
        "overhead_samples_ms": overhead,
    }


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (raw, rest) = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["in-process engine", "through the mesh"]
    for ax, key, ylabel in ((raw, "samples_ms", "time to first token (ms)"),
                            (rest, "overhead_samples_ms", "TTFT minus engine time (ms)")):
        ax.boxplot([result[key]["in_process"], result[key]["mesh"]], tick_labels=labels)
        ax.set_ylabel(ylabel)
    t = result["ttft_ms"]
    raw.set_title("TTFT, one request at a time")
    rest.set_title(f"beyond engine time: mesh adds {t['added_p50']:.2f} ms at p50 (target <= 2 ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=60, help="TTFT samples per system (default: 60)")
    parser.add_argument("--ttft-tokens", type=int, default=4, help="max_tokens of the TTFT requests (default: 4)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests, throughput (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per throughput request (default: 64)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, short outputs")
    parser.add_argument("--output", help="JSON path (default: bench/results/mesh_overhead.json)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens = 6, 4, 8
    result = asyncio.run(run(args))
    out = write_result("mesh_overhead", result, args.output)
    plot(result, out.with_suffix(".png"))
    t, tp = result["ttft_ms"], result["throughput"]
    print(f"TTFT p50: mesh {t['mesh']['p50']:.2f} ms, in-process {t['in_process']['p50']:.2f} ms "
          f"(raw difference {t['raw_added_p50']:.2f} ms); beyond engine time: mesh {t['overhead']['mesh']['p50']:.2f} "
          f"ms, in-process {t['overhead']['in_process']['p50']:.2f} ms: added {t['added_p50']:.2f} ms (target <= 2 ms)")
    print(f"HTTP floor (GET /healthz after idle) p50 {t['http_floor']['p50']:.2f} ms")
    print(f"transport floor p50 (HTTP + 1.5 NATS round trips of {t['nats_round_trip_floor']['p50']:.2f} ms): "
          f"{t['transport_floor_p50']:.2f} ms; added beyond it {t['added_beyond_floor_p50']:.2f} ms")
    print(f"tokens/s: mesh {tp['mesh_tokens_per_s']:.1f}, in-process {tp['in_process_tokens_per_s']:.1f}, "
          f"ratio {tp['ratio_mesh_over_in_process']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
