"""Rank-aware placement live: two gpu_worker processes on the CPU, the real scheduler and adapter store.

Both workers run the same number of requests, but one runs rank-64 adapters and the other rank-8 ones. By load
alone they are equal (most_idle would take the first by id, the rank-64 one); the scheduler's rank-aware policy,
fed by the workers' heartbeats (running ranks, their performance model), sends a new rank-8 request to the worker
whose decode step it makes cheaper.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers.lora_factory import make_random_adapter
from services.adapter_store.client import register_from_dir
from services.adapter_store.service import AdapterStoreService
from services.adapter_store.store import AdapterStore
from services.scheduler.perf_model import PerfModel
from services.scheduler.policies import RequestView, make_policy
from services.scheduler.service import SchedulerService
from shared.adapters import BaseModelShape
from shared.mesh_config import MeshConfig
from shared.nats_client import connect, publish, request
from shared.protocol import SUBJECT_GENERATE, CancelRequest, GenerateRequest, Placement, worker_subject

REPO = Path(__file__).resolve().parents[2]
# a padded-kernel model (batch x max rank): a rank-64 request in a batch makes every sequence pay for rank 64
MODEL = PerfModel(form="max_rank", decode_base_s=0.02, decode_per_seq_s=0.0005, decode_per_rank_s=2e-5,
                  prefill_base_s=0.01, prefill_per_token_s=1e-4, prefill_per_token_rank_s=1e-7, no_lora_tpot_s=0.025,
                  source="hand-written for this test")
LOAD = 3  # requests running on each worker


def _worker(worker_id: str, nats_url: str, model_file: Path, data_dir: Path, model_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARASERVE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "services.cli", "serve", "gpu_worker", "--nats-url", nats_url,
            "--worker-id", worker_id, "--perf-model", str(model_file), "--heartbeat-interval", "0.2",
            "--model", str(model_path), "--data-dir", str(data_dir),
            "--max-loras", "4", "--max-num-seqs", "8", "--log-level", "warning"]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _load(name: str, model: str, tokens: int = 600) -> GenerateRequest:
    return GenerateRequest(request_id=f"{name}-{uuid.uuid4().hex[:8]}", kind="completion", model=model,
                           sampling={"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True},
                           reply_to=f"test.load.{uuid.uuid4().hex}", prompt="Once upon a time")


@pytest.mark.slow
async def test_placement_follows_the_model_across_two_worker_processes(nats_server, hf_base, default_model_path,
                                                                      tmp_path):
    model_file = tmp_path / "perf.json"
    MODEL.save(model_file)
    procs = [_worker(w, nats_server.url, model_file, tmp_path / "data", default_model_path) for w in ("w-a", "w-b")]
    ncs = []
    try:
        from transformers import AutoConfig

        shape = BaseModelShape.from_hf_config(AutoConfig.from_pretrained(default_model_path))
        store_nc = await connect(nats_server.url, "test-store")
        ncs.append(store_nc)
        store = AdapterStoreService(AdapterStore(shape, "SmolLM2-135M-Instruct", 256))
        await store.start(store_nc)
        config = MeshConfig(nats_url=nats_server.url, heartbeat_interval=0.2, worker_timeout=3.0,
                            placement_policy="rank_aware")
        scheduler = SchedulerService(config)
        sched_nc = await connect(nats_server.url, "test-scheduler")
        ncs.append(sched_nc)
        await scheduler.start(sched_nc)
        nc = await connect(nats_server.url, "test-client")
        ncs.append(nc)
        for name, rank in (("big", 64), ("small", 8)):
            path = make_random_adapter(hf_base, tmp_path / name, seed=rank, r=rank, target_modules=["q_proj", "v_proj"])
            await register_from_dir(nc, name, path, timeout=30)

        async def until(predicate, what: str, timeout: float = 120.0) -> None:
            for _ in range(int(timeout / 0.1)):
                if predicate():
                    return
                for p in procs:
                    assert p.poll() is None, f"a worker exited: {p.stderr.read().decode()[-2000:]}"
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}")

        workers = scheduler.registry.workers
        await until(lambda: {"w-a", "w-b"} <= set(workers) and all(w.model for w in workers.values()),
                    "both workers' heartbeats, with their models")
        assert workers["w-a"].model == MODEL

        loads = [(_load("a", "big"), "w-a") for _ in range(LOAD)] + [(_load("b", "small"), "w-b") for _ in range(LOAD)]
        for req, worker_id in loads:  # straight to each worker, past the scheduler: a hotspot of our making
            await publish(nc, worker_subject(worker_id, "generate"), req)

        def loaded() -> bool:
            a, b = workers["w-a"].heartbeat, workers["w-b"].heartbeat
            return sorted(a.running_ranks) == [64] * LOAD and sorted(b.running_ranks) == [8] * LOAD

        await until(loaded, "both workers running their load")
        states = [workers["w-a"], workers["w-b"]]
        for s in states:
            s.placed.clear()
        probe = RequestView("probe", "small", 8, 4, 16)
        # the same load: placing by load alone takes the first by id
        assert make_policy("most_idle").choose(probe, [s.view() for s in states]).worker_id == "w-a"

        placement = await request(nc, SUBJECT_GENERATE, _load("probe", "small", tokens=16), Placement, timeout=30)
        assert placement.worker_id == "w-b"  # rank-aware: a rank-8 request does not join the rank-64 batch

        for req, worker_id in loads:
            await publish(nc, worker_subject(worker_id, "cancel"), CancelRequest(req.request_id))
        await scheduler.stop()
        await store.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise
        for c in ncs:
            await c.close()
