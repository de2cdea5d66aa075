"""The mesh's root configuration: one validated dataclass, filled from flags, then environment, then defaults.

Every setting has a flag (`--port`) and an environment variable (`CARASERVE_PORT`); a flag given on the command
line wins over the environment. Each service reads the slice it needs. Engine settings (model, dtype, ...) are
the engine's own (services/cli.py add_engine_args) and are not repeated here, except `served_model_name`,
which the gateway and the workers must agree on.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any


class MeshConfigError(ValueError):
    """A setting is invalid; the message is one line naming the flag and the variable."""


@dataclass
class MeshConfig:
    nats_url: str = "nats://127.0.0.1:4222"  # the NATS server every service connects to (with credentials)
    data_dir: str | None = None  # converted models, the embedded NATS server's JetStream store
    host: str = "127.0.0.1"  # gateway bind address
    port: int = 8000  # gateway HTTP port
    nats_port: int = 4222  # `caraserve up`: the embedded NATS server's port (loopback only)
    api_key: str | None = None  # Bearer key for /v1 inference routes; None: no key required (serve only)
    admin_key: str | None = None  # Bearer key for the adapter admin API; None: admin API disabled
    served_model_name: str | None = None  # the base model's name in requests (default derived from the model)
    worker_id: str | None = None  # gpu_worker's id on the mesh (default: host-pid)
    heartbeat_interval: float = 1.0  # seconds between worker heartbeats
    worker_timeout: float = 3.5  # a worker silent this long is declared lost
    max_pending: int = 256  # gateway: requests in flight at once; beyond it 429
    max_upload_mb: float = 512.0  # gateway: adapter upload size limit (413 beyond)
    request_timeout: float = 10.0  # seconds to wait for the scheduler/store to answer
    trace_exporter: str = "none"  # OpenTelemetry span exporter: none, console or otlp
    log_level: str = "info"
    placement_policy: str = "rank_aware"  # scheduler: rank_aware, random, round_robin, most_idle or first_fit
    perf_model: str | None = None  # gpu_worker: its performance model file (caraserve profile); None: cached/profiled
    slo_tpot_ms: float | None = None  # gpu_worker: SLO on time per output token; None: 1.5 × its no-LoRA time
    slo_ttft_ms: float | None = None  # gpu_worker: SLO on time to first token; None: none
    max_cpu_loras: int = 64  # gpu_worker: adapters from the store kept in host memory (LRU beyond it)

    def __post_init__(self) -> None:
        for name in ("port", "nats_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise MeshConfigError(f"--{_flag(name)} must be a port number 0-65535, got {getattr(self, name)}")
        for name in ("heartbeat_interval", "worker_timeout", "max_upload_mb", "request_timeout"):
            if not getattr(self, name) > 0:
                raise MeshConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.worker_timeout <= self.heartbeat_interval:
            raise MeshConfigError("--worker-timeout must be longer than --heartbeat-interval")
        if self.max_cpu_loras < 1:
            raise MeshConfigError(f"--max-cpu-loras must be >= 1, got {self.max_cpu_loras}")
        if self.max_pending < 1:
            raise MeshConfigError(f"--max-pending must be >= 1, got {self.max_pending}")
        if self.trace_exporter not in ("none", "console", "otlp"):
            raise MeshConfigError(f"--trace-exporter must be none, console or otlp, got {self.trace_exporter!r}")
        for name in ("slo_tpot_ms", "slo_ttft_ms"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise MeshConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise MeshConfigError(f"--log-level must be debug, info, warning or error, got {self.log_level!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


_HELP = {
    "nats_url": "NATS server URL, credentials included (nats://user:password@host:4222)",
    "data_dir": "data directory: converted models, JetStream store (default: ~/.cache/caraserve)",
    "host": "gateway bind address (default: 127.0.0.1)",
    "port": "gateway HTTP port (default: 8000)",
    "nats_port": "embedded NATS server port, loopback only (default: 4222)",
    "api_key": "API key clients send as 'Authorization: Bearer KEY' on /v1 routes",
    "admin_key": "separate key for the adapter admin API (/v1/adapters)",
    "served_model_name": "the base model's name in requests' `model` field",
    "worker_id": "this gpu_worker's id on the mesh (default: HOST-PID)",
    "heartbeat_interval": "seconds between worker heartbeats (default: 1.0)",
    "worker_timeout": "seconds of silence after which a worker is declared lost (default: 3.5)",
    "max_pending": "requests the gateway holds in flight before answering 429 (default: 256)",
    "max_upload_mb": "largest adapter upload in MiB; larger ones get 413 (default: 512)",
    "request_timeout": "seconds to wait for the scheduler or the adapter store (default: 10)",
    "trace_exporter": "OpenTelemetry span exporter: none, console or otlp (default: none)",
    "log_level": "debug, info, warning or error (default: info)",
    "placement_policy": "where requests go: rank_aware (the cost model; default), or a baseline: random, "
                        "round_robin, most_idle, first_fit",
    "perf_model": "the worker's performance model file from `caraserve profile` (default: the one cached in the "
                  "data directory, or a brief profile at start-up, then cached)",
    "slo_tpot_ms": "SLO on time per output token in ms, prefill included (default: 1.5 x the worker's measured "
                   "time per token without LoRA)",
    "slo_ttft_ms": "SLO on time to first token in ms (default: none)",
    "max_cpu_loras": "adapters fetched from the store that a worker keeps in host memory; beyond it the least "
                     "recently used idle ones are dropped and fetched again when asked for (default: 64)",
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def env_var(name: str) -> str:
    return "CARASERVE_" + name.upper()


def _parse_as(name: str) -> type:
    """How a setting's text (flag or environment variable) becomes its value: int, float or str."""
    annotation = {f.name: f.type for f in fields(MeshConfig)}[name]  # a string: annotations are postponed
    return int if "int" in annotation else float if "float" in annotation else str


def add_mesh_args(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Flags for the settings `names` (default: all); each help text names its environment variable."""
    group = parser.add_argument_group("mesh (each also settable by the environment variable shown)")
    for name in names or [f.name for f in fields(MeshConfig)]:
        group.add_argument(f"--{_flag(name)}", dest=f"mesh_{name}", type=_parse_as(name), metavar=_flag(name).upper().split("-")[-1],
                           help=f"{_HELP[name]} [{env_var(name)}]")


def mesh_config_from_args(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None,
                          **overrides: Any) -> MeshConfig:
    """Flags given > environment > defaults. MeshConfigError for a value that is not a number where one is needed."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(MeshConfig):
        flag_value = None
        if args is not None:  # served_model_name and data_dir are engine flags (services/cli.py) in engine commands
            flag_value = getattr(args, f"mesh_{f.name}", None)
            if flag_value is None and f.name in ("served_model_name", "data_dir"):
                flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
        elif environ.get(env_var(f.name), "") != "":
            raw = environ[env_var(f.name)]
            try:
                values[f.name] = _parse_as(f.name)(raw)
            except ValueError:
                raise MeshConfigError(f"{env_var(f.name)}={raw!r} is not a number") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MeshConfig(**values)
