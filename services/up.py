"""`caraserve up`: the whole mesh on this machine, one command.

1. Check the gateway and NATS ports, provision the base model once (so the services don't race converting it).
2. Start an embedded NATS server with JetStream under <data dir>/nats (adapters registered there survive
   restarts), loopback only, with a password generated for this start. It runs inside a small supervised child
   (`python -m services.up nats ...`), so that, like the services, it sits in its own process group: a Ctrl-C in
   the terminal reaches only `up`, which stops NATS last, after the services have drained their connections.
3. Start adapter_store, scheduler, --workers gpu_workers and the gateway as `caraserve serve <service>` child
   processes (services/supervisor.py). Secrets and settings travel in their environment (CARASERVE_*), never on
   their command line, so `ps` does not show them.
4. Wait for the gateway's /readyz, register the demo adapters never registered (a deleted one stays deleted),
   print the URL, the keys and a curl example, then the line "caraserve up: ready".
5. Restart a child that crashes; on SIGTERM/SIGINT stop the children (gateway first), then NATS; exit 0.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

from services.cli import CLIError, mesh_config
from services.supervisor import ChildSpec, GiveUp, Supervisor, describe_exit, remove_new_shm, shm_entries
from services.scheduler.perf_model import PerfModel, PerfModelError
from services.scheduler.service import check_placement_policy
from shared.mesh_config import MeshConfig, env_var
from shared.model_provisioning import ModelNotFoundError, ResolvedModel, resolve_model
from shared.nats_server import EmbeddedNatsServer, NatsServerError, free_port, is_listening, port_is_free
from shared.paths import data_dir as default_data_dir

READY_MARKER = "caraserve up: ready"
READY_TIMEOUT = 600.0  # default --ready-timeout: the first gpu_worker loads the model (and profiles it once)
POLL_INTERVAL = 0.2
# Engine flags passed through to gpu_worker and adapter_store (none of them secret).
_ENGINE_FLAGS = ("model", "served_model_name", "dtype", "device", "max_lora_rank", "max_loras", "max_num_seqs",
                 "max_num_batched_tokens", "attention_backend", "lora_backend", "cuda_graphs", "cpu_assist",
                 "cpu_workers", "threads")
# MeshConfig fields `up` does not hand to its children as they are: NATS is ours, worker ids are per worker.
_NOT_PASSED = ("nats_url", "nats_port", "worker_id")
_NATS_PASSWORD_ENV = "CARASERVE_UP_NATS_PASSWORD"  # the NATS child's password (environment, not argv)
NATS_START_TIMEOUT = 30.0  # seconds for the embedded NATS server to listen


def _say(message: str) -> None:
    print(f"caraserve up: {message}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    """What `up` starts, settled before anything starts."""

    config: MeshConfig
    data_dir: Path
    model: ResolvedModel
    served_model_name: str
    workers: int
    engine_argv: list[str]  # engine flags for gpu_worker and adapter_store
    demo_adapters: bool
    ready_timeout: float  # seconds to wait for the mesh to serve

    @property
    def local_host(self) -> str:
        """The gateway's address as a client on this machine reaches it."""
        host = self.config.host
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    @property
    def base_url(self) -> str:
        return f"http://{self.local_host}:{self.config.port}"


def _port_in_use(host: str, port: int) -> bool:
    try:
        return not port_is_free(port, host)
    except socket.gaierror as exc:
        raise CLIError(f"cannot listen on host {host!r}: {exc.strerror}: pass --host or set CARASERVE_HOST") from None


def _prepare(args) -> Plan:
    """Validate the settings and ports, provision the model; CLIError (one line) for what the user can fix."""
    config = mesh_config(args)
    check_placement_policy(config)
    if config.perf_model:  # every gpu_worker loads it: a bad file is one error here, not a crash loop there
        try:
            PerfModel.load(config.perf_model)
        except PerfModelError as exc:
            raise CLIError(f"--perf-model: {exc}") from None
    if args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    ready_timeout = READY_TIMEOUT if args.ready_timeout is None else args.ready_timeout
    if not ready_timeout > 0:
        raise CLIError(f"--ready-timeout must be > 0, got {ready_timeout:g}")
    if config.port == 0:
        config.port = free_port(config.host or "127.0.0.1")
    if config.nats_port == 0:
        config.nats_port = free_port()
    if _port_in_use(config.host, config.port):
        raise CLIError(f"port {config.port} is already in use: pass --port or set {env_var('port')}")
    if _port_in_use("127.0.0.1", config.nats_port):
        raise CLIError(f"NATS port {config.nats_port} is already in use: pass --nats-port or set "
                       f"{env_var('nats_port')}")
    data = default_data_dir(config.data_dir).expanduser().resolve()
    try:
        model = resolve_model(args.model, str(data))  # converts the default GGUF once, with a progress bar
    except ModelNotFoundError as exc:
        raise CLIError(str(exc)) from None
    engine_argv: list[str] = []
    for name in _ENGINE_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            engine_argv += [f"--{name.replace('_', '-')}", str(value)]
    return Plan(config=config, data_dir=data, model=model,
                served_model_name=config.served_model_name or model.name, workers=args.workers,
                engine_argv=engine_argv, demo_adapters=not args.no_demo_adapters, ready_timeout=ready_timeout)


def _child_env(plan: Plan, nats_url: str, api_key: str, admin_key: str) -> dict[str, str]:
    """The environment every child gets: ours, with every mesh setting spelled out (inherited CARASERVE_* go)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARASERVE_")}
    for f in fields(MeshConfig):
        value = getattr(plan.config, f.name)
        if f.name not in _NOT_PASSED and value is not None:
            env[env_var(f.name)] = str(value)
    env.update({
        env_var("nats_url"): nats_url,  # holds the NATS password
        env_var("api_key"): api_key,
        env_var("admin_key"): admin_key,
        env_var("data_dir"): str(plan.data_dir),
        env_var("served_model_name"): plan.served_model_name,
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _specs(plan: Plan, env: dict[str, str], nats_password: str) -> list[ChildSpec]:
    """Children in start order: nats, adapter_store, scheduler, gpu_worker(s), gateway."""
    def argv(service: str, engine: bool) -> list[str]:
        return [sys.executable, "-m", "services.cli", "serve", service] + (plan.engine_argv if engine else [])

    nats_argv = [sys.executable, "-m", "services.up", "nats", str(plan.data_dir / "nats"), str(plan.config.nats_port)]
    nats_env = {**env, _NATS_PASSWORD_ENV: nats_password}

    def worker_env(index: int):
        # A restarted worker gets a new id: the scheduler then sees the old one fall silent and declares it lost
        # (failing its in-flight requests) instead of mistaking the new process for the old one.
        return lambda start: {**env, env_var("worker_id"): f"worker-{index}" + (f"-r{start}" if start else "")}

    specs = [ChildSpec("nats", nats_argv, lambda _: nats_env),
             ChildSpec("adapter_store", argv("adapter_store", True), lambda _: env),
             ChildSpec("scheduler", argv("scheduler", False), lambda _: env)]
    names = ["gpu_worker"] if plan.workers == 1 else [f"gpu_worker[{i}]" for i in range(plan.workers)]
    specs += [ChildSpec(name, argv("gpu_worker", True), worker_env(i)) for i, name in enumerate(names)]
    specs.append(ChildSpec("gateway", argv("gateway", False), lambda _: env))
    return specs


class _StopSignals:
    """SIGTERM, SIGINT and SIGHUP ask `up` to stop; the handler only records which (printing is for the loop)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _wait_nats(plan: Plan, supervisor: Supervisor) -> None:
    """Return once the NATS child listens; CLIError if it exits (it has printed why) or is too slow."""
    nats = supervisor.start("nats")
    deadline = time.monotonic() + NATS_START_TIMEOUT
    while time.monotonic() < deadline:
        if nats.process.poll() is not None:
            raise CLIError("the embedded NATS server did not start (see the line above)")
        if is_listening(plan.config.nats_port):
            return
        time.sleep(0.05)
    raise CLIError(f"the embedded NATS server did not listen on 127.0.0.1:{plan.config.nats_port} within "
                   f"{NATS_START_TIMEOUT:g}s (log: {plan.data_dir / 'nats' / 'nats-server.log'})")


def _http_get(url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int | None, bytes]:
    """(status, body); status None when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None, b""


def _wait_ready(plan: Plan, supervisor: Supervisor, stop: _StopSignals) -> bool:
    """Poll /readyz until 200 (True), a stop signal (False); CLIError after plan.ready_timeout; GiveUp passes
    through."""
    started = time.monotonic()
    last_state, last_shown = "", 0.0
    while stop.received is None:
        supervisor.poll()
        status, _ = _http_get(f"{plan.base_url}/readyz")
        if status == 200:
            return True
        if status is None:
            state = "starting the services"
        elif supervisor.running("gpu_worker"):
            state = "gpu_worker loading the model (on a first start, also profiling it)"
        else:
            state = "waiting for a gpu_worker"
        now = time.monotonic()
        if now - started > plan.ready_timeout:
            raise CLIError(f"the mesh was not ready within {plan.ready_timeout:g}s ({state}); stopped everything, "
                           "see the services' log lines above (a slower machine: --ready-timeout)")
        if state != last_state or now - last_shown >= 15:
            _say(f"waiting for the mesh: {state}... ({now - started:.0f}s)")
            last_state, last_shown = state, now
        time.sleep(1.0)
    return False


# beside the JetStream store (<data dir>/nats/): the demo adapters once registered in it, so that one the user
# deleted is not registered again at the next start
DEMO_MARKER = "demo-adapters.json"


def _demo_registered_before(marker: Path) -> set[str]:
    try:
        names = json.loads(marker.read_text())
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()
    except (OSError, ValueError):
        return set()


async def _register_demo_adapters(nats_url: str, marker: Path, timeout: float = 60.0) -> list[str]:
    """Register the demo adapters the store has never had (`marker` lists those it had, even if deleted since);
    return every registered adapter's name."""
    from services.adapter_store.client import list_adapters, register_from_dir
    from shared.demo_adapters import DEMO_ADAPTERS, demo_adapter_path
    from shared.nats_client import MeshError, connect

    nc = await connect(nats_url, "caraserve-up")
    try:
        deadline = time.monotonic() + timeout
        while True:  # the store may still be setting up its buckets
            try:
                known = {info.name for info in await list_adapters(nc, timeout=10.0)}
                break
            except MeshError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        before = _demo_registered_before(marker)
        for name in DEMO_ADAPTERS:
            path = demo_adapter_path(name)
            if name in known or name in before:
                continue
            if not (path / "adapter_config.json").is_file():
                _say(f"demo adapter {name} is missing ({path}); run `make demo-adapters`")
                continue
            try:
                info = await register_from_dir(nc, name, path, timeout=timeout)
            except Exception as exc:  # e.g. it does not fit a --model other than the default: keep serving
                _say(f"demo adapter {name} not registered: {exc}")
                continue
            _say(f"registered demo adapter {info.name} (rank {info.rank})")
            known.add(name)
        marker.write_text(json.dumps(sorted(before | (known & set(DEMO_ADAPTERS)))) + "\n")
        return sorted(known)
    finally:
        await nc.close()


def _served_models(plan: Plan, api_key: str) -> list[str] | None:
    status, body = _http_get(f"{plan.base_url}/v1/models", api_key, timeout=10.0)
    try:
        return [m["id"] for m in json.loads(body)["data"]] if status == 200 else None
    except (ValueError, KeyError, TypeError):
        return None


def _banner(plan: Plan, api_key: str, admin_key: str, adapters: list[str]) -> str:
    model = "pirate" if "pirate" in adapters else adapters[0] if adapters else plan.served_model_name
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 32})
    lines = [
        "",
        "CaraServe mesh is up",
        f"  OpenAI API  {plan.base_url}/v1",
        f"  API key     {api_key}",
        f"  admin key   {admin_key}   (adapter admin API: /v1/adapters)",
        f"  model       {plan.served_model_name}",
        f"  adapters    {', '.join(adapters) if adapters else '(none)'}",
        f"  data        {plan.data_dir}",
        "  try:",
        f"    curl {plan.base_url}/v1/chat/completions -H 'Authorization: Bearer {api_key}' \\",
        f"      -H 'Content-Type: application/json' -d '{body}'",
        "",
    ]
    return "\n".join(lines)


def up_command(args) -> int:
    """Start the mesh, supervise it until SIGTERM/SIGINT, stop it; 0 after a clean stop."""
    plan = _prepare(args)
    api_key = plan.config.api_key or secrets.token_urlsafe(24)
    admin_key = plan.config.admin_key or secrets.token_urlsafe(24)
    nats = EmbeddedNatsServer(plan.data_dir / "nats", port=plan.config.nats_port)  # the child runs it; .url here
    env = _child_env(plan, nats.url, api_key, admin_key)
    supervisor = Supervisor(_specs(plan, env, nats.password))
    stop = _StopSignals()
    shm_before = shm_entries()
    stop.install()
    try:
        _wait_nats(plan, supervisor)
        _say(f"NATS with JetStream on 127.0.0.1:{plan.config.nats_port} (store: {nats.store_dir})")
        if stop.received is not None:
            return 0
        supervisor.start_all()
        if not _wait_ready(plan, supervisor, stop):
            return 0
        adapters: list[str] = []
        if plan.demo_adapters:
            try:
                adapters = asyncio.run(_register_demo_adapters(nats.url, nats.store_dir / DEMO_MARKER))
            except Exception as exc:  # the mesh serves the base model without them
                _say(f"demo adapters not registered: {exc}")
        served = _served_models(plan, api_key)
        if served is not None:
            adapters = sorted(set(served) - {plan.served_model_name})
        print(_banner(plan, api_key, admin_key, adapters), flush=True)
        print(f"{READY_MARKER} (Ctrl-C to stop)", flush=True)
        while stop.received is None:
            supervisor.poll()
            time.sleep(POLL_INTERVAL)
        return 0
    except GiveUp as exc:
        raise CLIError(str(exc)) from None
    finally:
        if stop.received is not None:
            _say(f"{signal.Signals(stop.received).name} received, stopping the services")
        supervisor.stop_all()  # reverse order: gateway first, NATS last
        for name in remove_new_shm(shm_before):
            _say(f"removed leftover shared memory /dev/shm/{name}")
        stop.restore()
        _say("stopped")


def nats_main(argv: list[str]) -> int:
    """`python -m services.up nats STORE_DIR PORT` (password in $CARASERVE_UP_NATS_PASSWORD): run the embedded
    NATS server until SIGTERM/SIGINT/SIGHUP, then stop it; exit with nats-server's code if it dies first."""
    store_dir, port = argv[0], int(argv[1])
    stop = _StopSignals()
    stop.install()
    server = EmbeddedNatsServer(store_dir, port=port, password=os.environ[_NATS_PASSWORD_ENV])
    try:
        server.start()
    except NatsServerError as exc:
        print(f"caraserve up: nats: {exc}", file=sys.stderr, flush=True)
        return 1
    while stop.received is None and server.process.poll() is None:
        time.sleep(POLL_INTERVAL)
    if stop.received is None:  # nats-server exited on its own: a crash
        print(f"caraserve up: nats: nats-server exited with {describe_exit(server.process.returncode)}",
              file=sys.stderr, flush=True)
        return 1
    server.stop()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["nats"] or len(sys.argv) != 4:
        sys.exit("usage: python -m services.up nats STORE_DIR PORT (started by `caraserve up`)")
    sys.exit(nats_main(sys.argv[2:]))
