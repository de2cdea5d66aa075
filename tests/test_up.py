"""`caraserve up` end to end: the whole mesh as child processes of one command, on the default model.

The slow tests share one `up` (module fixture) and run in file order: it serves; it survives a gpu_worker killed
mid-stream; SIGTERM stops everything (the last test, which leaves nothing behind). The fast test checks that a
busy port is refused with one line before anything starts.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.nats_server import free_port

REPO = Path(__file__).resolve().parents[1]
READY_MARKER = "caraserve up: ready"
DEMO = ("caps", "json", "pirate")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARASERVE_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Up:
    """A running `caraserve up` whose merged output is read (and kept) by a thread, so its pipe never fills."""

    def __init__(self, argv: list[str], data_dir: Path, port: int) -> None:
        self.data_dir, self.url = data_dir, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=_env(), cwd=REPO, text=True, bufsize=1)
        self.lines: list[str] = []
        self.api_key = ""
        self.base_model = ""
        self.shm_before: set[str] = set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match | None:
        """The first output line from index `start` matching `pattern`; None on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if found := re.search(pattern, line):
                    return found
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the reader catch the last lines
                return next((m for line in self.lines[start:] if (m := re.search(pattern, line))), None)
            time.sleep(0.2)
        return None

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.lines[-n:])


def _processes() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (ppid, cmdline, environ) of every process we may read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                environ = b""
            found[int(entry.name)] = (ppid, cmdline, environ)
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants(pid: int) -> dict[int, str]:
    procs = _processes()
    result, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline, _) in procs.items():
            if ppid == parent and child not in result:
                result[child] = cmdline
                frontier.append(child)
    return result


def _mentioning(text: str) -> dict[int, str]:
    """Processes whose command line or environment mention `text` (the tmp data dir: nats-server and services)."""
    needle = text.encode()
    return {pid: cmdline for pid, (_, cmdline, environ) in _processes().items()
            if pid != os.getpid() and (text in cmdline or needle in environ)}


def _http(url: str, key: str | None = None, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.strip() else {}
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as exc:
        return 0, {"error": str(exc)}


def _stop(proc: subprocess.Popen, data_dir: Path) -> None:
    """Teardown safety net: whatever the tests left running goes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in _mentioning(str(data_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def up(tmp_path_factory, default_model_path):
    data_dir = tmp_path_factory.mktemp("up-data")
    port, nats_port = free_port(), free_port()
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    argv = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(data_dir), "--port", str(port),
            "--nats-port", str(nats_port), "--model", str(default_model_path)]
    running = Up(argv, data_dir, port)
    running.shm_before = shm_before
    running.base_model = Path(default_model_path).name
    try:
        if running.wait_for(re.escape(READY_MARKER), timeout=240) is None:
            pytest.fail(f"`caraserve up` was not ready within 240s (exit code {running.proc.poll()}):\n"
                        f"{running.tail()}")
        key = running.wait_for(r"^\s*API key\s+(\S+)", timeout=1)
        assert key, running.tail()
        running.api_key = key.group(1)
        yield running
    finally:
        _stop(running.proc, data_dir)


@pytest.mark.slow
def test_up_serves_the_mesh(up):
    status, _ = _http(f"{up.url}/readyz")
    assert status == 200
    status, models = _http(f"{up.url}/v1/models", up.api_key)
    assert status == 200, models
    ids = {m["id"] for m in models["data"]}
    assert {up.base_model, *DEMO} <= ids, ids
    assert _http(f"{up.url}/v1/models")[0] == 401  # the key `up` printed is the one the gateway enforces
    status, answer = _http(f"{up.url}/v1/completions", up.api_key,
                           {"model": up.base_model, "prompt": "The capital of France is", "max_tokens": 4})
    assert status == 200, answer
    assert isinstance(answer["choices"][0]["text"], str)
    assert 1 <= answer["usage"]["completion_tokens"] <= 4
    children = _descendants(up.proc.pid)
    services = {name for name in ("adapter_store", "scheduler", "gpu_worker", "gateway")
                if any(f"serve {name}" in cmdline for cmdline in children.values())}
    assert services == {"adapter_store", "scheduler", "gpu_worker", "gateway"}, children
    assert not [c for c in children.values() if up.api_key in c], "the API key shows on a command line"


def _worker_pid(up: Up) -> int | None:
    return next((pid for pid, (ppid, cmdline, _) in _processes().items()
                 if ppid == up.proc.pid and "serve gpu_worker" in cmdline), None)


async def _stream_and_kill(up: Up, worker_pid: int) -> tuple[list[dict], str | None]:
    """Stream a long completion, SIGKILL the worker after the first chunks; return the events and a transport
    error (None if the stream ended in order)."""
    import aiohttp

    body = {"model": up.base_model, "prompt": "Count from one to five hundred: one, two, three,",
            "max_tokens": 200, "stream": True}
    events: list[dict] = []
    killed = False
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(f"{up.url}/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {up.api_key}"}) as response:
            assert response.status == 200, await response.text()
            try:
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    events.append(json.loads(line[len("data:"):]))
                    if not killed and len(events) >= 2:
                        os.kill(worker_pid, signal.SIGKILL)
                        killed = True
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return events, f"{type(exc).__name__}: {exc}"
    assert killed, f"the stream ended before two chunks: {events}"
    return events, None


@pytest.mark.slow
def test_killed_worker_fails_its_stream_and_is_restarted(up):
    old_pid = _worker_pid(up)
    assert old_pid, _descendants(up.proc.pid)
    mark = len(up.lines)
    events, transport_error = asyncio.run(_stream_and_kill(up, old_pid))
    errors = [e for e in events if "error" in e]
    assert errors or transport_error, f"the stream ended normally after the worker died: {events[-3:]}"
    assert not any(choice.get("finish_reason") == "length" for e in events for choice in e.get("choices", [])), \
        "the request finished on a dead worker"
    assert up.wait_for(r"gpu_worker \(pid \d+\) exited unexpectedly with signal SIGKILL", 10, mark), up.tail()
    assert up.wait_for(r"gpu_worker restarted \(pid \d+\)", 10, mark), up.tail()

    deadline, last = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        if _http(f"{up.url}/readyz", timeout=5)[0] == 200:
            last = _http(f"{up.url}/v1/completions", up.api_key,
                         {"model": "pirate", "prompt": "Hello", "max_tokens": 4})
            if last[0] == 200:
                break
        time.sleep(2)
    else:
        pytest.fail(f"no successful completion within 180s of the restart; last answer {last}\n{up.tail()}")
    assert _worker_pid(up) not in (None, old_pid)
    assert up.proc.poll() is None


@pytest.mark.slow
def test_sigterm_stops_everything(up):
    tree = _descendants(up.proc.pid)
    assert tree
    up.proc.send_signal(signal.SIGTERM)
    try:
        assert up.proc.wait(30) == 0, up.tail()
    except subprocess.TimeoutExpired:
        pytest.fail(f"`caraserve up` did not stop within 30s of SIGTERM:\n{up.tail()}")
    assert up.wait_for(r"caraserve up: stopped", 5), up.tail()
    alive = {pid: cmdline for pid, cmdline in tree.items() if _alive(pid)}
    assert not alive, f"children left running: {alive}"
    assert not _mentioning(str(up.data_dir)), "processes still mention the data dir"
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not shm_after - up.shm_before, f"new /dev/shm entries: {shm_after - up.shm_before}"


@pytest.mark.parametrize("busy", ["--port", "--nats-port"])
def test_up_refuses_a_busy_port(tmp_path, busy):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ports = {"--port": str(free_port()), "--nats-port": str(free_port()), busy: str(port)}
        argv = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(tmp_path / "data"),
                *[x for flag, value in ports.items() for x in (flag, value)]]
        result = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0], result.stderr
    assert not (tmp_path / "data").exists(), "up started something before checking its ports"


@pytest.mark.parametrize("flags, message", [
    (["--placement-policy", "fastest"], "--placement-policy must be one of rank_aware, random, round_robin, "
                                        "most_idle, first_fit, got 'fastest'"),
    (["--perf-model", "/no/such/model.json"], "--perf-model: no performance model file at /no/such/model.json"),
    (["--ready-timeout", "0"], "--ready-timeout must be > 0, got 0"),
])
def test_up_refuses_bad_settings_before_starting_anything(tmp_path, flags, message, capsys):
    from services.cli import main

    assert main(["up", "--data-dir", str(tmp_path / "data"), *flags]) == 1
    assert capsys.readouterr().err.strip() == f"caraserve up: error: {message}"
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- supervisor (fast: tiny Python children)

def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_supervisor_restarts_a_crashing_child_then_gives_up():
    from services.supervisor import ChildSpec, GiveUp, Supervisor

    out = open(os.devnull, "w")
    supervisor = Supervisor([ChildSpec("crasher", _python("import sys; sys.exit(3)"), lambda n: dict(os.environ))],
                            out=out, restart_delay=0.05, max_crashes=3, crash_window=60)
    supervisor.start_all()
    deadline = time.monotonic() + 30
    with pytest.raises(GiveUp, match=r"crasher exited 3 times within 60s \(last: code 3\)"):
        while time.monotonic() < deadline:
            supervisor.poll()
            time.sleep(0.02)
    assert supervisor.children[0].starts == 3
    supervisor.stop_all()
    out.close()


def test_supervisor_stops_in_reverse_order_and_kills_the_stubborn(tmp_path):
    from services.supervisor import ChildSpec, Supervisor

    log = tmp_path / "order"
    polite = ("import os, signal, sys, time, pathlib\n"
              "def bye(*_):\n    open({log!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\n"
              "pathlib.Path({log!r} + '.' + sys.argv[1]).touch()\n"
              "time.sleep(60)\n").format(log=str(log))
    stubborn = ("import signal, time, pathlib\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                f"pathlib.Path({str(log)!r} + '.stubborn').touch()\ntime.sleep(60)\n")
    specs = [ChildSpec(name, _python(polite) + [name], lambda n: dict(os.environ)) for name in ("a", "b", "c")]
    specs.insert(1, ChildSpec("stubborn", _python(stubborn), lambda n: dict(os.environ)))
    out = open(os.devnull, "w")
    supervisor = Supervisor(specs, out=out, stop_timeout=1.0)
    supervisor.start_all()
    deadline = time.monotonic() + 30
    while not all(Path(f"{log}.{s.name}").exists() for s in specs) and time.monotonic() < deadline:
        time.sleep(0.05)
    supervisor.stop_all()
    out.close()
    assert log.read_text().split() == ["c", "b", "a"]
    assert all(c.process.poll() is not None for c in supervisor.children)
    assert supervisor.children[1].process.returncode == -signal.SIGKILL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_children_die_with_the_supervisor():
    script = ("import os, sys, time\nfrom services.supervisor import ChildSpec, Supervisor\n"
              "s = Supervisor([ChildSpec('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'], "
              "lambda n: dict(os.environ))])\ns.start_all()\nprint(s.children[0].pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen(_python(script), stdout=subprocess.PIPE, text=True, cwd=REPO, env=_env())
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()  # SIGKILL: the supervisor gets no chance to stop its children
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its supervisor"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)



def test_up_hands_engine_threads_to_its_workers(tmp_path, default_model_path):
    from services import up
    from services.cli import build_parser

    def plan(*flags):
        args = build_parser().parse_args(["up", "--port", "0", "--nats-port", "0", "--data-dir", str(tmp_path),
                                          "--model", str(default_model_path), *flags])
        argv = up._prepare(args).engine_argv
        return argv[argv.index("--threads") + 1] if "--threads" in argv else None

    assert plan() is None  # torch's default
    assert plan("--threads", "3") == "3"


async def test_demo_adapters_are_registered_once(nats_server, default_model_path, tmp_path):
    """`caraserve up` registers the demo adapters at the first start only: one deleted since is not registered
    again at the next start (nor one the marker says was registered before)."""
    from transformers import AutoConfig

    from services.adapter_store.client import delete_adapter
    from services.adapter_store.service import AdapterStoreService
    from services.adapter_store.store import AdapterStore
    from services.up import DEMO_MARKER, _register_demo_adapters
    from shared.adapters import BaseModelShape
    from shared.nats_client import connect

    shape = BaseModelShape.from_hf_config(AutoConfig.from_pretrained(default_model_path))
    nc = await connect(nats_server.url, "test-store")
    store = AdapterStoreService(AdapterStore(shape, Path(default_model_path).name, 256))
    await store.start(nc)
    try:
        marker = tmp_path / DEMO_MARKER
        assert await _register_demo_adapters(nats_server.url, marker) == sorted(DEMO)
        assert json.loads(marker.read_text()) == sorted(DEMO)
        await delete_adapter(nc, "caps", timeout=10.0)
        assert await _register_demo_adapters(nats_server.url, marker) == sorted(set(DEMO) - {"caps"})
        marker.unlink()  # a store without the marker (made before it existed): what is missing is registered
        assert await _register_demo_adapters(nats_server.url, marker) == sorted(DEMO)
    finally:
        await store.stop()
        await nc.close()
