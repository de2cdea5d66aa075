#!/usr/bin/env python
"""Handoff benchmark (CPU): the shared-memory activation channel vs a pipe and a Unix socket; LoRA tokens/s.

1. Round trip per call, engine process <-> one echo process, for payloads of T tokens × --hidden float32 each way
   (T = 0 is the bare signal):
     shm-signal  the bare flag round trip (request seq out, done seq back), no payload
     shm     HandoffChannel: copy x into the input buffer, bump the request seq; the echo process (busy-polling)
             bumps the done seq; copy the output buffer out — what the pool does per worker slice
     pipe    multiprocessing Pipe: send_bytes(x), the echo sends the bytes back, recv_bytes_into
     socket  AF_UNIX stream socket, length-prefixed: the same exchange
2. LoRA delta tokens/s of ONE cpu_prefill worker (single thread) by rank: CpuPrefillPool(1).compute_delta over the
   four fused groups of one Llama-2-7B-shaped layer (hidden 4096, intermediate 11008, all seven targets at rank r),
   --tokens tokens per call; next to it the same math in this process (torch, 1 thread), so the handoff's share
   shows. This is the per-core token capacity the token split is sized from. Per --dtypes: the engine's dtype, which
   the host cache, the channel and the worker's products take (bfloat16/float16 natively where this CPU has oneDNN
   kernels for them, else through float32: the row's `compute`), with each rate's ratio to float32's in this run.

Output: JSON (default bench/results/handoff.json) with machine, git commit, config and rows. Times in µs.
"""
from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine_info, progress, summarize, timestamp, write_result  # noqa: E402

RANKS = [8, 16, 32, 64, 128]


# ---- echo processes (spawn targets) ----------------------------------------------------------------------------
def _shm_echo(name: str, parent: int) -> None:
    from services.cpu_prefill.handoff import STATUS_OK, HandoffChannel

    channel = HandoffChannel.attach(name)
    channel.set_worker(os.getpid())
    last = 0
    while True:  # busy-poll: the benchmark keeps it hot; it exits with the benchmark (reparented) if that is killed
        seq = channel.wait_request(last, lambda: os.getppid() != parent, spin_s=1.0)
        if seq is None:
            break
        channel.finish(seq, STATUS_OK)
        last = seq
    channel.close()


def _pipe_echo(conn) -> None:
    buf = bytearray(1 << 26)
    while True:
        n = conn.recv_bytes_into(buf)
        if n == 1 and buf[0] == 0xFF:
            break
        conn.send_bytes(buf, 0, n)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def _socket_echo(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buf = memoryview(bytearray(1 << 26))
    head = memoryview(bytearray(8))
    try:
        while True:
            _recv_exact(sock, head)
            (n,) = struct.unpack("<q", head)
            if n < 0:
                break
            _recv_exact(sock, buf[:n])
            sock.sendall(head)
            sock.sendall(buf[:n])
    except EOFError:
        pass
    sock.close()


def _bytes(t) -> memoryview:
    """A flat byte view of a CPU tensor's storage (also for zero elements)."""
    return memoryview(t.numpy().reshape(-1).view("uint8"))


# ---- round trips -----------------------------------------------------------------------------------------------
def time_calls(fn, iters: int) -> list[float]:
    for _ in range(min(50, iters)):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def bench_round_trips(ctx, torch, hidden: int, token_counts: list[int], iters: int) -> list[dict]:
    from services.cpu_prefill.handoff import HandoffChannel

    rows = []
    max_tokens = max(max(token_counts), 1)
    # shm
    channel = HandoffChannel.create(max_tokens, hidden, hidden)
    proc = ctx.Process(target=_shm_echo, args=(channel.name, os.getpid()), daemon=True)
    proc.start()
    try:
        while channel.status() == 0:
            time.sleep(0.01)
        from services.cpu_prefill.handoff import DONE_SEQ, REQ_SEQ

        ctrl = channel.ctrl

        def signal_call() -> None:  # the bare flag round trip: no payload, no torch
            seq = ctrl[REQ_SEQ] + 1
            ctrl[REQ_SEQ] = seq
            channel.last_seq = seq  # (what submit would count)
            while ctrl[DONE_SEQ] != seq:
                pass

        rows.append(dict(channel="shm-signal", tokens=0, bytes_each_way=0,
                         us=summarize(time_calls(signal_call, iters))))
        for t in token_counts:
            x = torch.randn(t, hidden)
            y = torch.empty(t, hidden)

            def shm_call() -> None:
                seq = channel.submit(x, 0, 0, 0, hidden)
                while not channel.done(seq):
                    pass
                y.copy_(channel.output_view(t, hidden))

            rows.append(dict(channel="shm", tokens=t, bytes_each_way=4 * t * hidden,
                             us=summarize(time_calls(shm_call, iters))))
    finally:
        channel.request_stop()
        proc.join(5)
        channel.close()
    # pipe
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_pipe_echo, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    try:
        for t in token_counts:
            x = torch.randn(t, hidden)
            y = torch.empty(t, hidden)
            xb, yb = _bytes(x), _bytes(y)

            def pipe_call() -> None:
                ours.send_bytes(xb)
                ours.recv_bytes_into(yb)

            rows.append(dict(channel="pipe", tokens=t, bytes_each_way=4 * t * hidden,
                             us=summarize(time_calls(pipe_call, iters))))
    finally:
        ours.send_bytes(b"\xff")
        proc.join(5)
        ours.close()
    # unix socket
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "echo.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        proc = ctx.Process(target=_socket_echo, args=(path,), daemon=True)
        proc.start()
        sock, _ = server.accept()
        try:
            for t in token_counts:
                x = torch.randn(t, hidden)
                y = torch.empty(t, hidden)
                xb, yb = _bytes(x), _bytes(y)
                head_out, head_in = struct.pack("<q", len(xb)), memoryview(bytearray(8))

                def socket_call() -> None:
                    sock.sendall(head_out)
                    sock.sendall(xb)
                    _recv_exact(sock, head_in)
                    _recv_exact(sock, yb)

                rows.append(dict(channel="socket", tokens=t, bytes_each_way=4 * t * hidden,
                                 us=summarize(time_calls(socket_call, iters))))
        finally:
            sock.sendall(struct.pack("<q", -1))
            proc.join(5)
            sock.close()
            server.close()
    return rows


# ---- LoRA tokens/s per worker ----------------------------------------------------------------------------------
def llama7b_adapter(torch, rank: int, hidden: int, inter: int):
    from shared.adapters import LoRAAdapter, LoRAModuleWeights

    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    g = torch.Generator().manual_seed(rank)
    modules = [LoRAModuleWeights(0, m, torch.randn(rank, i, generator=g) * 0.01,
                                 torch.randn(o, rank, generator=g) * 0.01, 2.0) for m, (i, o) in shapes.items()]
    widths = {m: o for m, (_, o) in shapes.items()}
    return LoRAAdapter(name=f"r{rank}", path=Path("."), config={}, modules=modules), widths


def bench_lora_rate(torch, ranks: list[int], tokens: int, hidden: int, inter: int, iters: int,
                    core: int | None, dtype) -> list[dict]:
    from services.cpu_prefill.host_cache import HostAdapterCache, attach
    from services.cpu_prefill.pool import CpuPrefillPool
    from services.cpu_prefill.worker import compute_dtype, lora_delta_

    group_in = {"qkv": hidden, "o": hidden, "gate_up": hidden, "down": inter}
    group_out = {"qkv": 3 * hidden, "o": hidden, "gate_up": 2 * inter, "down": hidden}
    xs = {g: torch.randn(tokens, w).to(dtype) for g, w in group_in.items()}
    rows = []
    with HostAdapterCache(4 << 30, dtype=dtype) as cache, \
            CpuPrefillPool(1, tokens, inter, 2 * inter, timeout_s=60.0, cores=[core] if core is not None else None,
                           dtype=dtype) as pool:
        for rank in ranks:
            adapter, widths = llama7b_adapter(torch, rank, hidden, inter)
            host = cache.put(adapter, 1, widths)

            def layer_on_worker() -> None:
                for g in group_in:
                    pool.compute_delta(host, 0, g, xs[g], out_features=group_out[g])

            shm, layers = attach(host)
            outs = {g: torch.empty(tokens, group_out[g], dtype=dtype) for g in group_in}

            def layer_in_process() -> None:
                for g in group_in:
                    lora_delta_(outs[g], xs[g], layers[0][g])

            worker_us = summarize(time_calls(layer_on_worker, iters))
            local_us = summarize(time_calls(layer_in_process, iters))  # one thread, as the worker
            del layers, outs
            shm.close()
            rows.append(dict(dtype=str(dtype).removeprefix("torch."),
                             compute=str(compute_dtype(dtype)).removeprefix("torch."), rank=rank, tokens=tokens,
                             adapter_layer_bytes=host.nbytes, worker_layer_us=worker_us, inprocess_layer_us=local_us,
                             worker_tokens_per_s=tokens / (worker_us["p50"] * 1e-6),
                             inprocess_tokens_per_s=tokens / (local_us["p50"] * 1e-6)))
            progress("handoff", f"{rows[-1]['dtype']:8s} rank {rank:3d}: worker "
                                f"{rows[-1]['worker_tokens_per_s']:9.0f} tok/s per layer, "
                                f"in-process {rows[-1]['inprocess_tokens_per_s']:9.0f}")
            pool.forget(host)
            cache.evict(host.name)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096, help="activation width (default: 4096)")
    parser.add_argument("--intermediate", type=int, default=11008, help="MLP width (default: 11008)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per LoRA call (default: 128)")
    parser.add_argument("--iters", type=int, default=2000, help="round trips per case (default: 2000)")
    parser.add_argument("--core", type=int, default=None, help="pin the LoRA worker to this core")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="engine dtypes for the LoRA rates, comma-separated (default: float32,bfloat16,float16)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer iterations, ranks 8 and 64")
    parser.add_argument("--output", help="JSON path (default: bench/results/handoff.json)")
    args = parser.parse_args()
    import multiprocessing as mp

    import torch

    # one intra-op thread here: on a small machine a second OpenMP thread copying the slice competes for the core
    # the busy-polling peer spins on (measured on 2 cores: 16-token round trips of ~13 ms instead of ~16 us)
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    token_counts = [0, 1, 16, 128]
    iters = 200 if args.quick else args.iters
    ranks = [8, 64] if args.quick else RANKS
    tokens = min(args.tokens, 32) if args.quick else args.tokens
    trips = bench_round_trips(ctx, torch, args.hidden, token_counts, iters)
    for r in trips:
        progress("handoff", f"{r['channel']:10s} T={r['tokens']:3d}  p50 {r['us']['p50']:8.1f} us  "
                            f"mean {r['us']['mean']:8.1f} us")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float32", "bfloat16", "float16") for d in dtypes):
        parser.error(f"--dtypes: float32, bfloat16 and/or float16, got {args.dtypes!r}")
    rates = []
    for name in dtypes:
        rates += bench_lora_rate(torch, ranks, tokens, args.hidden, args.intermediate, max(5, iters // 100),
                                 args.core, getattr(torch, name))
    base = {r["rank"]: r for r in rates if r["dtype"] == "float32"}
    for r in rates:  # each rate against float32's at the same rank, measured in this run
        if r["rank"] in base:
            r["worker_rate_vs_float32"] = r["worker_tokens_per_s"] / base[r["rank"]]["worker_tokens_per_s"]
    result = dict(benchmark="handoff", timestamp=timestamp(), machine=machine_info(), git=git_commit(),
                  config=dict(hidden=args.hidden, intermediate=args.intermediate, tokens=tokens, iters=iters,
                              core=args.core, quick=args.quick, dtypes=dtypes),
                  round_trips=trips, lora_rate=rates)
    out = write_result("handoff", result, args.output)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
