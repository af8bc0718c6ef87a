"""Shared fixtures: real redis-server processes on free ports, and daemons as real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from batchd.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parent.parent


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not on PATH: install it (apt-get install redis-server)")
    return path


@pytest.fixture
def redis_server():
    """A real, private redis-server on a free port; killed and deleted afterwards."""
    server = EmbeddedServer(binary=redis_binary()).start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


class Daemons:
    """Starts `batchd` daemons as real child processes and stops them all."""

    def __init__(self, url: str, tmp_path: Path):
        self.url = url
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen] = []

    def start(self, *argv: str, log_name: str | None = None) -> subprocess.Popen:
        log_path = self.tmp_path / f"{log_name or argv[0]}-{len(self.processes)}.log"
        log_file = open(log_path, "wb")
        process = subprocess.Popen([sys.executable, "-m", "batchd.cli", *argv[:1], "--redis", self.url, *argv[1:]],
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log_file.close()
        process.log_path = log_path
        self.processes.append(process)
        return process

    def scheduler(self, *extra: str) -> subprocess.Popen:
        return self.start("scheduler", "--max-wait-ms", "20", *extra)

    def echo_worker(self, *extra: str) -> subprocess.Popen:
        return self.start("worker", "--engine", "echo", *extra)

    def wait_for_workers(self, count: int = 1, timeout: float = 60.0) -> None:
        from batchd.client.keys import Keys
        from batchd.status import read_status

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(read_status(client, Keys())["workers"]) >= count:
                return
            for process in self.processes:
                if process.poll() is not None:
                    pytest.fail(f"daemon exited early:\n{process.log_path.read_text()}")
            time.sleep(0.1)
        pytest.fail(f"{count} workers did not come up in {timeout}s")

    def logs(self) -> str:
        return "\n".join(f"--- {p.args}\n{p.log_path.read_text()}" for p in self.processes)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def daemons(redis_server, tmp_path):
    fleet = Daemons(redis_server.url, tmp_path)
    yield fleet
    fleet.stop_all()
