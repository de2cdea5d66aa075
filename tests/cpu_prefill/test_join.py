"""cpu_prefill processes that join an engine through its rendezvous socket (`caraserve serve cpu_prefill`).

Pool level: a pool with no spawned worker and joined workers started through the service's process entry
(join.join_worker_main) gives the reference deltas; a joined worker killed mid-call costs that call
(CpuAssistTimeout), is retired and its channel unlinked; one joining while calls run is used by later calls; one
asked to leave (SIGTERM) is retired without a failed call. End to end: `caraserve serve cpu_prefill` as a
subprocess and an engine (embedded model, demo adapters) with cpu_assist always and cpu_workers 0: same greedy
tokens as cpu_assist off, the work done by the joined processes; SIGTERM -> exit 0 and the engine serves on.

Run with OMP_NUM_THREADS=1. Rendezvous directories live under /tmp with short names (Unix socket paths are
limited to 107 bytes).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from services.cpu_prefill.handoff import DONE_SEQ, REQ_SEQ
from services.cpu_prefill.host_cache import HostAdapterCache
from services.cpu_prefill.join import join_worker_main
from services.cpu_prefill.pool import CpuAssistTimeout, CpuPrefillPool
from services.cpu_prefill.rendezvous import list_engines, run_dir
from services.cpu_prefill.segments import SHM_DIR
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS, build_slot_weights
from helpers.waiting import wait_for
from test_cpu_assist import (ADAPTERS, GROUP_IN, GROUP_OUT, HIDDEN, MAX_TOKENS, NUM_LAYERS, WIDTHS, make_adapter,
                             reference_delta)

REPO = Path(__file__).resolve().parents[2]
GROUPS = list(PROJECTION_GROUPS)
CTX = mp.get_context("spawn")


def our_shm() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"caraserve-{os.getpid()}-*")}


@pytest.fixture
def short_dir():
    d = Path(tempfile.mkdtemp(prefix="cpj-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cache():
    adapters = [make_adapter(name, ranks, seed) for seed, (name, ranks) in enumerate(ADAPTERS.items())]
    host = HostAdapterCache(64 << 20)
    hosts = [host.put(a, NUM_LAYERS, WIDTHS) for a in adapters]
    weights = [build_slot_weights(a, NUM_LAYERS, WIDTHS, torch.float32, torch.device("cpu")) for a in adapters]
    yield hosts, weights
    host.close()


def start_joiner(directory: Path, index: int) -> mp.process.BaseProcess:
    """One process of `caraserve serve cpu_prefill`, as the service starts it."""
    proc = CTX.Process(target=join_worker_main, args=(str(directory), index, None, "info", os.getpid()),
                       name=f"joiner-{index}")
    proc.start()
    return proc


def check_call(pool, hosts, weights, k: int, tokens: int = 37) -> None:
    """One delta of the adapter that targets every group (cycling layers and groups) against the reference."""
    group = GROUPS[k % len(GROUPS)]
    layer, a = k % NUM_LAYERS, list(ADAPTERS).index("r16-all")
    x = torch.randn(tokens, GROUP_IN[group])
    delta = pool.compute_delta(hosts[a], layer, group, x, out_features=GROUP_OUT[group])
    torch.testing.assert_close(delta, reference_delta(weights[a], layer, group, x), rtol=1e-5, atol=1e-5)


def test_joined_workers_compute_die_join_and_leave(short_dir, cache):
    hosts, weights = cache
    before = our_shm()
    pool = CpuPrefillPool(0, MAX_TOKENS, max(GROUP_IN.values()), max(GROUP_OUT.values()), timeout_s=30.0,
                          rendezvous_dir=short_dir)
    procs = [start_joiner(short_dir, i) for i in range(2)]
    try:
        assert pool.alive() == 0 and pool.socket_path.exists()
        with pytest.raises(CpuAssistTimeout):  # nobody there yet: refused at once
            pool.compute_delta(hosts[0], 0, "qkv", torch.randn(3, HIDDEN), out_features=GROUP_OUT["qkv"])
        wait_for(lambda: pool.alive() == 2, 60, "two joined workers")
        assert sorted(pool.pids()) == sorted(p.pid for p in procs)

        # the same deltas as the torch reference, tokens split across both (rounds beyond 2 x MAX_TOKENS)
        for tokens in (1, 37, 2 * MAX_TOKENS + 5):
            for a, (host, sw) in enumerate(zip(hosts, weights)):
                for layer in range(NUM_LAYERS):
                    for group in PROJECTION_GROUPS:
                        x = torch.randn(tokens, GROUP_IN[group])
                        delta = pool.compute_delta(host, layer, group, x, out_features=GROUP_OUT[group])
                        torch.testing.assert_close(delta, reference_delta(sw, layer, group, x), rtol=1e-5, atol=1e-5)
        assert all(w.channel.ctrl[DONE_SEQ] > 0 for w in pool._workers)

        # killed mid-call: that call fails fast, the worker is retired and its channel unlinked, the rest serve
        victim = next(w for w in pool._workers if w.handle.pid == procs[0].pid)
        os.kill(procs[0].pid, signal.SIGSTOP)

        ctrl = victim.channel.ctrl

        def kill_when_submitted() -> None:
            deadline = time.monotonic() + 10
            try:
                while ctrl[REQ_SEQ] == ctrl[DONE_SEQ] and time.monotonic() < deadline:
                    time.sleep(1e-4)
            except ValueError:  # the channel was closed: the call is over
                pass
            os.kill(procs[0].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_submitted)
        killer.start()
        victim_segment = victim.channel.name
        t0 = time.monotonic()
        with pytest.raises(CpuAssistTimeout):
            check_call(pool, hosts, weights, 1, tokens=20)
        killer.join()
        assert time.monotonic() - t0 < 3.0, "a dead joined worker took long to notice (timeout 30 s)"
        assert pool.alive() == 1 and not (SHM_DIR / victim_segment).exists()
        check_call(pool, hosts, weights, 2)

        # a worker joining while calls are being made takes tasks in later calls
        procs.append(start_joiner(short_dir, 2))
        k = 3
        while pool.alive() < 2:
            check_call(pool, hosts, weights, k)
            k += 1
            assert k < 100_000, "the third worker never joined"
        newcomer = next(w for w in pool._workers if w.handle.pid == procs[2].pid)
        check_call(pool, hosts, weights, k)
        assert newcomer.channel.ctrl[DONE_SEQ] > 0

        # SIGTERM: the worker leaves between tasks; no call fails while it does; it exits 0
        leaver = next(w for w in pool._workers if w.handle.pid == procs[1].pid)
        leaver_segment = leaver.channel.name
        os.kill(procs[1].pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while pool.alive() > 1:
            check_call(pool, hosts, weights, k)  # raises if a call failed
            k += 1
            assert time.monotonic() < deadline, "the leaving worker was not retired"
        procs[1].join(10)
        assert procs[1].exitcode == 0
        assert not (SHM_DIR / leaver_segment).exists()
        check_call(pool, hosts, weights, k)
    finally:
        pool.close()
        for p in procs:  # after close the joiners look for another engine; SIGTERM ends them
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs[1:]] == [0, 0]
    assert our_shm() <= before, "a channel was left in /dev/shm"
    assert not list(short_dir.glob("*.sock")) and not list(short_dir.glob("*.lock"))


def test_joiners_spread_over_engines_and_move_when_one_closes(short_dir, cache):
    """Two engines on the node: one joiner each; when one engine closes, its joiner moves to the other."""
    hosts, weights = cache
    dims = (MAX_TOKENS, max(GROUP_IN.values()), max(GROUP_OUT.values()))
    first, second = (CpuPrefillPool(0, *dims, rendezvous_dir=short_dir) for _ in range(2))
    procs = [start_joiner(short_dir, i) for i in range(2)]
    try:
        wait_for(lambda: first.alive() == 1 and second.alive() == 1, 60, "one joiner on each engine")
        check_call(second, hosts, weights, 0)
        first.close()
        wait_for(lambda: second.alive() == 2, 30, "the first engine's joiner to move to the second")
        check_call(second, hosts, weights, 1)
        assert all(w.channel.ctrl[DONE_SEQ] > 0 for w in second._workers)
    finally:
        first.close()
        second.close()
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(15)
    assert [p.exitcode for p in procs] == [0, 0]
    assert not list(short_dir.glob("*.sock"))


def test_stale_socket_of_a_crashed_engine_is_skipped_and_removed(short_dir):
    """An engine killed with SIGKILL leaves its socket and lock files: a joiner removes them and waits on."""
    script = ("import sys, time\n"
              "from services.cpu_prefill.pool import CpuPrefillPool\n"
              "pool = CpuPrefillPool(0, 4, 8, 8, rendezvous_dir=sys.argv[1])\n"
              "print(pool.socket_path, flush=True)\n"
              "time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    engine = subprocess.Popen([sys.executable, "-c", script, str(short_dir)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=REPO)
    try:
        sock = Path(engine.stdout.readline().strip())
        assert sock.exists()
    finally:
        engine.kill()
        engine.wait()
    assert [e.path for e in list_engines(short_dir)] == [sock]  # left behind
    joiner = start_joiner(short_dir, 0)
    try:
        wait_for(lambda: not sock.exists(), 60, "the stale socket to be removed")
        assert not sock.with_suffix(".lock").exists()
        assert joiner.is_alive()  # waiting for the next gpu_worker
    finally:
        os.kill(joiner.pid, signal.SIGTERM)
        joiner.join(15)
    assert joiner.exitcode == 0


# ---- end to end: `caraserve serve cpu_prefill` and an engine on the embedded model ------------------------------
PROMPTS = [[1, 9690, 314, 253, 2365, 30, 2], list(range(400, 431)), [28, 16, 1, 43, 42, 7], [5, 17, 99]]
MODELS = ["pirate", "caps", None, "json"]


def engine_outputs(engine) -> list[list[int]]:
    from services.gpu_worker.engine.sequence import SamplingParams

    results = engine.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0.0), MODELS)
    return [r.token_ids for r in results]


def new_engine(**config):
    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from shared.demo_adapters import demo_adapter_path

    engine = LLMEngine(EngineConfig(num_kv_blocks=32, block_size=16, max_num_batched_tokens=32, **config))
    try:
        for name in ("pirate", "caps", "json"):
            engine.load_adapter(name, demo_adapter_path(name))
    except BaseException:
        engine.close()
        raise
    return engine


def test_serve_cpu_prefill_end_to_end(short_dir, default_model_path):
    data = short_dir / "d"
    directory = run_dir(data)
    log_path = short_dir / "service.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CARASERVE_DATA_DIR", None)
    with open(log_path, "w") as log:  # started first: its processes wait for a gpu_worker
        service = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "cpu_prefill", "--workers", "2",
                                    "--data-dir", str(data)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO)
    before = our_shm()
    engine = None
    try:
        model = str(default_model_path)  # (data_dir is the model cache too: do not convert the model into it)
        reference_engine = new_engine(model=model, cpu_assist="off")
        try:
            reference = engine_outputs(reference_engine)
        finally:
            reference_engine.close()

        # the service's processes are up and looking before the engine opens its socket (no race on a busy box)
        wait_for(lambda: "waiting for a gpu_worker at" in log_path.read_text(), 120, "the service to start")
        engine = new_engine(model=model, cpu_assist="always", cpu_workers=0, data_dir=str(data))
        pool, backend = engine.cpu_assist.pool, engine.cpu_assist.backend
        assert pool.socket_path.parent == directory and pool.pids() == []
        wait_for(lambda: pool.alive() == 2, 60, "the service's two workers to join")
        assert engine_outputs(engine) == reference
        assert backend.cpu_ranges > 0 and backend.fallbacks == 0  # the joined processes did the LoRA prefill work
        assert all(w.channel.ctrl[DONE_SEQ] > 0 for w in pool._workers)

        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0
        cpu_ranges = backend.cpu_ranges
        assert engine_outputs(engine) == reference  # served on the device path
        assert backend.cpu_ranges == cpu_ranges and backend.fallbacks == 0 and pool.alive() == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        if engine is not None:
            engine.close()
        text = log_path.read_text()
    assert "waiting for a gpu_worker at" in text, text
    assert text.count("joined gpu_worker") == 2, text
    assert "caraserve cpu_prefill: stopped" in text, text
    assert our_shm() <= before, "the engine left shared memory behind"
    assert not list(directory.glob("*.sock")) and not list(directory.glob("*.lock"))


def test_serve_cpu_prefill_user_errors(capsys, short_dir):
    from services.cli import main
    from services.cpu_prefill.service import parse_cores

    assert parse_cores("0,2-4, 7") == [0, 2, 3, 4, 7] and parse_cores(None) is None
    long_dir = short_dir / ("x" * 100)
    for argv, message in ([["--workers", "0"], "--workers must be >= 1"],
                          [["--cores", "a,b"], "--cores: 'a' is not a core number"],
                          [["--data-dir", str(long_dir)], "too long for a Unix socket path"]):
        assert main(["serve", "cpu_prefill", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("caraserve serve cpu_prefill: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not long_dir.exists()
