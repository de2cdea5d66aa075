"""End to end through the gateway with the official `openai` client: every service real, outputs equal to the
engine's offline outputs, resources freed on disconnect, a crashed worker ends its streams with an error and a
new worker serves again, and one request is one trace across the services."""
from __future__ import annotations

import asyncio
import threading

import aiohttp
import openai
import pytest

from services.adapter_store.client import register_from_dir
from services.gpu_worker import service as worker_service
from services.gpu_worker.engine.sequence import SamplingParams
from shared.demo_adapters import DEMO_ADAPTERS, demo_adapter_path

MAX_TOKENS = 12
QUESTION = "Name a fruit that is yellow."
PROMPT = "The three primary colors are"


def client(mesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.base_url}/v1", api_key=mesh.config.api_key, max_retries=0)


async def register_demo_adapters(mesh) -> None:
    nc = mesh.connections[0]
    for name in DEMO_ADAPTERS:
        await register_from_dir(nc, name, demo_adapter_path(name), timeout=30)


def offline(engine, kind: str, model: str) -> str:
    adapter = None if model == engine.model_name else model
    prompt = engine.encode_chat([{"role": "user", "content": QUESTION}]) if kind == "chat" else PROMPT
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), [adapter])
    return result.text


async def ask(c: openai.AsyncOpenAI, kind: str, model: str, stream: bool) -> str:
    if kind == "chat":
        kwargs = dict(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS,
                      temperature=0)
        if not stream:
            return (await c.chat.completions.create(**kwargs)).choices[0].message.content
        parts = [chunk.choices[0].delta.content or "" async for chunk in await c.chat.completions.create(
            stream=True, **kwargs) if chunk.choices]
        return "".join(parts)
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        return (await c.completions.create(**kwargs)).choices[0].text
    return "".join([chunk.choices[0].text async for chunk in await c.completions.create(stream=True, **kwargs)
                    if chunk.choices])


@pytest.mark.slow
async def test_concurrent_requests_over_adapters_equal_offline_outputs(mesh, reference_engine):
    await register_demo_adapters(mesh)
    models = [mesh.engine.model_name, *DEMO_ADAPTERS]
    cases = [(kind, model, stream) for model in models for kind in ("chat", "completion") for stream in (True, False)]
    c = client(mesh)
    answers = await asyncio.gather(*(ask(c, *case) for case in cases))
    # in a thread: blocking the event loop would silence the in-process worker's heartbeats
    expected = {(kind, model): await asyncio.to_thread(offline, reference_engine, kind, model)
                for kind, model, _ in cases}
    for (kind, model, stream), answer in zip(cases, answers):
        assert answer == expected[(kind, model)], (kind, model, stream)
    assert len({expected[("chat", m)] for m in models}) == len(models)  # the adapters really change the answers
    models_listed = {m.id for m in (await c.models.list()).data}
    assert set(models) <= models_listed


async def test_fetched_adapters_are_parsed_off_the_step_thread(mesh, monkeypatch):
    """On the step thread a parse waited for the step in progress (1-2 s into a burst on a CPU); parsing runs no torch
    op (tests/shared/test_adapters.py checks it starts no OpenMP team), so it runs on a thread of its own."""
    threads = []
    read = mesh.engine.read_adapter

    def recording(name, path):
        threads.append(threading.current_thread().name)
        return read(name, path)

    monkeypatch.setattr(mesh.engine, "read_adapter", recording)
    await register_from_dir(mesh.connections[0], "thread-check", demo_adapter_path(next(iter(DEMO_ADAPTERS))),
                            timeout=30)
    assert await ask(client(mesh), "completion", "thread-check", stream=False)
    assert len(threads) == 1 and not threads[0].startswith("engine-step"), threads


def hold_fetches(monkeypatch) -> asyncio.Event:
    """Every adapter fetch of the worker waits until the returned event is set."""
    release = asyncio.Event()
    fetch = worker_service.fetch_adapter

    async def held(js, info, root):
        await release.wait()
        return await fetch(js, info, root)

    monkeypatch.setattr(worker_service, "fetch_adapter", held)
    return release


async def until(condition, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_a_cold_adapter_load_holds_up_no_other_request(mesh, monkeypatch):
    """nats-py runs one subscription's callbacks one at a time: a worker that awaited an adapter's load in its
    generate handler held every later request behind it, and loaded cold adapters one after another."""
    release = hold_fetches(monkeypatch)
    await register_from_dir(mesh.connections[0], "held-back", demo_adapter_path(next(iter(DEMO_ADAPTERS))),
                            timeout=30)
    c = client(mesh)
    cold = asyncio.create_task(ask(c, "completion", "held-back", stream=False))
    await until(lambda: mesh.worker._arrivals)
    assert mesh.worker._heartbeat().queued == 1  # the schedulers count it in the worker's load
    assert await asyncio.wait_for(ask(c, "completion", mesh.engine.model_name, stream=False), 30)
    assert not cold.done()  # still waiting for its adapter while the base-model request went through
    release.set()
    assert await asyncio.wait_for(cold, 30)
    assert mesh.worker._arrivals == {} and mesh.worker._wanted == {}


async def test_a_cold_request_is_admitted_in_the_pass_that_registers_its_adapter(mesh, monkeypatch):
    """Admitted one step later, a burst's cold requests each waited a whole step more (1-2 s on a CPU busy with long
    prompts) before they could run."""
    steps, events = [0], []
    step, register, add = mesh.engine.step, mesh.engine.register_adapter, mesh.engine.add_request

    def counting_step():
        steps[0] += 1
        return step()

    def registering(adapter):
        events.append(("register", steps[0]))
        return register(adapter)

    def adding(request_id, prompt, params, adapter=None):
        if adapter is not None:
            events.append(("add", steps[0]))
        return add(request_id, prompt, params, adapter=adapter)

    monkeypatch.setattr(mesh.engine, "step", counting_step)
    monkeypatch.setattr(mesh.engine, "register_adapter", registering)
    monkeypatch.setattr(mesh.engine, "add_request", adding)
    await register_from_dir(mesh.connections[0], "same-pass", demo_adapter_path(next(iter(DEMO_ADAPTERS))),
                            timeout=30)
    c = client(mesh)
    busy = asyncio.create_task(c.completions.create(model=mesh.engine.model_name, prompt=PROMPT, max_tokens=200,
                                                    temperature=0))  # keeps the engine stepping meanwhile
    await until(lambda: steps[0] > 2)
    assert await ask(c, "completion", "same-pass", stream=False)
    (_, registered_at), (_, added_at) = events
    assert [e for e, _ in events] == ["register", "add"] and added_at == registered_at
    assert not busy.done()
    busy.cancel()
    await asyncio.gather(busy, return_exceptions=True)


async def test_every_engine_call_runs_on_the_step_thread(mesh, monkeypatch):
    """The engine is not thread-safe, and a torch op on the event loop's thread (registering an adapter copies it
    into the pools) starts a second OpenMP team that spins on the cores the step needs: registration, unloading,
    tokenizing, adding, aborting and stepping all belong on the worker's step thread."""
    threads: dict[str, set[str]] = {}
    for method in ("register_adapter", "unload_adapter", "encode_chat", "add_request", "abort", "step"):
        def recording(*args, _call=getattr(mesh.engine, method), _name=method, **kwargs):
            threads.setdefault(_name, set()).add(threading.current_thread().name)
            return _call(*args, **kwargs)
        monkeypatch.setattr(mesh.engine, method, recording)
    await register_from_dir(mesh.connections[0], "on-step-thread", demo_adapter_path(next(iter(DEMO_ADAPTERS))),
                            timeout=30)
    c = client(mesh)
    assert await ask(c, "chat", "on-step-thread", stream=False)  # cold: fetched, registered, then added
    stream = await c.completions.create(model=mesh.engine.model_name, prompt=PROMPT, max_tokens=200, temperature=0,
                                        stream=True)
    await stream.__anext__()
    await stream.close()  # the client goes away: the worker aborts it
    await until(lambda: "abort" in threads and not mesh.engine.has_unfinished())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {mesh.config.admin_key}"}) as http:
        async with http.delete(f"{mesh.base_url}/v1/adapters/on-step-thread") as resp:
            assert resp.status == 200
    await until(lambda: "unload_adapter" in threads)
    assert set(threads) == {"register_adapter", "unload_adapter", "encode_chat", "add_request", "abort", "step"}
    assert all(name.startswith("engine-step") for names in threads.values() for name in names), threads


async def test_an_adapter_load_that_fails_answers_its_requests_with_an_error(mesh, monkeypatch):
    """A fetch that dies of something other than a refusal (a NATS timeout under load) ends the request with a clear
    error instead of leaving the client waiting for tokens that never come."""

    async def timing_out(js, info, root):
        raise TimeoutError("nats: timeout")

    monkeypatch.setattr(worker_service, "fetch_adapter", timing_out)
    await register_from_dir(mesh.connections[0], "unlucky", demo_adapter_path(next(iter(DEMO_ADAPTERS))),
                            timeout=30)
    with pytest.raises(openai.APIStatusError) as err:
        await asyncio.wait_for(ask(client(mesh), "completion", "unlucky", stream=False), 30)
    assert err.value.status_code == 503 and "could not be loaded" in str(err.value)
    assert mesh.worker._arrivals == {} and mesh.worker._wanted == {}


async def test_a_request_cancelled_while_its_adapter_loads_never_runs(mesh, monkeypatch):
    release = hold_fetches(monkeypatch)
    await register_from_dir(mesh.connections[0], "left-behind", demo_adapter_path(next(iter(DEMO_ADAPTERS))),
                            timeout=30)
    cold = asyncio.create_task(ask(client(mesh), "completion", "left-behind", stream=True))
    await until(lambda: mesh.worker._arrivals)
    cold.cancel()  # the client goes away: the gateway cancels, the worker drops the request before admission
    await until(lambda: not mesh.worker._arrivals)
    release.set()
    await until(lambda: "left-behind" in mesh.engine.adapter_names())  # the load itself completes, for later use
    await asyncio.sleep(0.2)  # an admission, had there been one, would reach the engine within a loop turn
    assert not mesh.engine.has_unfinished() and mesh.worker._running == {} and mesh.worker._wanted == {}


@pytest.mark.slow
async def test_client_disconnect_frees_kv_blocks_and_adapter(mesh):
    await register_demo_adapters(mesh)
    engine = mesh.engine
    body = {"model": "pirate", "prompt": "Count: 1, 2, 3, 4,", "max_tokens": 400, "stream": True,
            "temperature": 0}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {mesh.config.api_key}"}) as http:
        async with http.post(f"{mesh.base_url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            for _ in range(3):
                await resp.content.readline()
            assert engine.has_unfinished()
        # the response is closed mid-stream: the client went away
    for _ in range(200):
        if not engine.has_unfinished() and not mesh.worker._running:
            break
        await asyncio.sleep(0.05)
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.in_use == {} and engine.adapters.pinned == {}


async def stream_until_error(mesh, on_first_chunk, match: str) -> None:
    """Start a long streamed completion, run `on_first_chunk()` when its first chunk arrives, and expect the stream to
    end with an error event matching `match` (within ten worker timeouts, not never)."""
    stream = await client(mesh).completions.create(model=mesh.engine.model_name, prompt="Count: 1, 2, 3,",
                                                   max_tokens=400, temperature=0, stream=True)
    got_chunk = False
    with pytest.raises(openai.APIError, match=match):
        async with asyncio.timeout(10 * mesh.config.worker_timeout):
            async for _ in stream:
                if not got_chunk:
                    got_chunk = True
                    await on_first_chunk()
    assert got_chunk


@pytest.mark.slow
async def test_worker_crash_mid_stream_then_a_new_worker_serves(mesh):
    c = client(mesh)
    await stream_until_error(mesh, mesh.crash_worker, match="lost")
    async with aiohttp.ClientSession() as http:  # no worker: not ready, and requests get 503
        for _ in range(100):
            async with http.get(f"{mesh.base_url}/readyz") as resp:
                if resp.status == 503:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 503
    with pytest.raises(openai.APIStatusError) as err:
        await c.completions.create(model=mesh.engine.model_name, prompt="Hi", max_tokens=2)
    assert err.value.status_code == 503
    await mesh.start_worker("w2")
    await mesh.wait_ready()
    answer = await c.completions.create(model=mesh.engine.model_name, prompt=PROMPT, max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 4


@pytest.mark.slow
async def test_a_worker_restarted_under_the_same_id_ends_the_streams_it_lost(mesh):
    """Its heartbeats resume before the gateway misses them, but no longer list the old request: the client gets an
    error event instead of waiting forever."""

    async def restart_under_the_same_id() -> None:
        await mesh.crash_worker()
        await mesh.start_worker("w1")  # back within worker_timeout: never seen as lost

    await stream_until_error(mesh, restart_under_the_same_id, match="has not listed this request")
    answer = await client(mesh).completions.create(model=mesh.engine.model_name, prompt=PROMPT, max_tokens=4,
                                                   temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 4


@pytest.mark.slow
async def test_an_engine_failure_ends_the_streams_and_marks_the_worker_crashed(mesh, monkeypatch):
    """A step that raises (a bug, a device error) must not leave a worker that heartbeats 'ready' but serves
    nothing: its requests get an error and it sets `crashed`, on which its process exits 1 to be restarted."""

    def failing_step():
        raise RuntimeError("device lost")

    async def break_the_engine() -> None:
        monkeypatch.setattr(mesh.engine, "step", failing_step)

    await stream_until_error(mesh, break_the_engine, match="engine failed")
    await until(mesh.worker.crashed.is_set)
    assert not mesh.worker._accepting and not mesh.worker._running
    monkeypatch.undo()
    for request_id in list(mesh.engine._seqs):  # the process would exit and free them; this engine lives on
        mesh.engine.abort(request_id)
    mesh.engine.step()


@pytest.mark.slow
async def test_deleted_adapter_is_refused_to_new_requests(mesh):
    await register_demo_adapters(mesh)
    c = client(mesh)
    assert (await c.completions.create(model="caps", prompt="hello", max_tokens=2)).usage.completion_tokens == 2
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {mesh.config.admin_key}"}) as http:
        async with http.delete(f"{mesh.base_url}/v1/adapters/caps") as resp:
            assert resp.status == 200
    for _ in range(100):  # the worker hears the deletion event
        if "caps" not in mesh.engine.adapter_names():
            break
        await asyncio.sleep(0.05)
    with pytest.raises(openai.NotFoundError):
        await c.completions.create(model="caps", prompt="hello", max_tokens=2)
    assert "caps" not in {m.id for m in (await c.models.list()).data}


@pytest.mark.slow
async def test_two_workers_share_the_load(mesh, reference_engine):
    from services.gpu_worker.service import GpuWorkerService

    second = GpuWorkerService(reference_engine, mesh.config, "w2")
    await mesh.start(second)
    for _ in range(100):  # the scheduler has heard from both
        if len([s for s in mesh.services if getattr(s, "registry", None) and len(s.registry.workers) == 2]):
            break
        await asyncio.sleep(0.05)
    c = client(mesh)
    seen: set[str] = set()

    async def one(i: int) -> None:
        stream = await c.completions.create(model=mesh.engine.model_name, prompt=f"{i} + {i} =", max_tokens=3,
                                            temperature=0, stream=True)
        async for _ in stream:
            seen.update(w for w, s in (("w1", mesh.worker), ("w2", second)) if s._running)

    await asyncio.gather(*(one(i) for i in range(6)))
    assert seen == {"w1", "w2"}


@pytest.mark.slow
async def test_responses_report_the_engine_time_in_server_timing(mesh):
    """Streamed: the engine time until the first token (the header goes out with it); complete: until the end."""
    url = f"{mesh.base_url}/v1/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {mesh.config.api_key}"}) as http:
        for stream in (True, False):
            body = {"model": mesh.engine.model_name, "prompt": PROMPT, "max_tokens": 4, "stream": stream}
            t0 = asyncio.get_running_loop().time()
            async with http.post(url, json=body) as resp:
                assert resp.status == 200
                timing = resp.headers["Server-Timing"]
                await resp.read()
            elapsed_ms = 1000 * (asyncio.get_running_loop().time() - t0)
            name, dur, desc = timing.split(";")
            assert name == "engine" and desc.startswith("desc=")
            assert 0 < float(dur.removeprefix("dur=")) < elapsed_ms


@pytest.mark.slow
async def test_bad_requests_through_the_whole_mesh(mesh):
    c = client(mesh)
    with pytest.raises(openai.BadRequestError, match="context"):  # the worker's tokenizer decides
        await c.completions.create(model=mesh.engine.model_name, prompt="word " * (mesh.engine.max_model_len + 8),
                                   max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await c.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n"):
        await c.chat.completions.create(model=mesh.engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                        n=2)
    ok = await c.completions.create(model=mesh.engine.model_name, prompt="hi", max_tokens=2)  # still serving
    assert ok.usage.completion_tokens == 2


@pytest.mark.slow
async def test_worker_keeps_at_most_max_cpu_loras_fetched_adapters(mesh, reference_engine):
    await register_demo_adapters(mesh)
    first, second = list(DEMO_ADAPTERS)[:2]
    mesh.config.max_cpu_loras = 1
    try:
        c = client(mesh)
        # off the event loop: the services' heartbeats share it, and a blocked loop for over worker_timeout (1 s)
        # gets the worker declared lost
        expected = await asyncio.to_thread(offline, reference_engine, "completion", first)
        assert await ask(c, "completion", first, False) == expected
        assert first in mesh.engine.adapter_names() and first in mesh.worker._fetched
        first_dir = mesh.worker._fetched[first]
        await ask(c, "completion", second, False)
        names = mesh.engine.adapter_names()
        assert second in names and first not in names  # the least recently used one made room
        assert first not in mesh.worker._fetched and not first_dir.exists()
        assert await ask(c, "completion", first, False) == expected  # fetched again on demand
        assert first in mesh.engine.adapter_names() and second not in mesh.engine.adapter_names()
    finally:
        mesh.config.max_cpu_loras = 64
