"""Shared fixtures: real redis-server processes on free ports, and daemons as real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from batchd.embedded import EmbeddedServer, SentinelSet
from batchd.status import stop_processes, wait_for_workers



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

    def __init__(self, url: str, tmp_path: Path, shards: int = 1):
        self.url = url
        self.tmp_path = tmp_path
        self.shards = shards
        self.processes: list[subprocess.Popen] = []

    def start(self, *argv: str, log_name: str | None = None) -> subprocess.Popen:
        log_path = self.tmp_path / f"{log_name or argv[0]}-{len(self.processes)}.log"
        log_file = open(log_path, "wb")
        # Outside the checkout, as an operator runs them: nothing at the repository root
        # stands in for the installed package (an editable or a plain install).
        sharded = ["--shards", str(self.shards)] if self.shards > 1 and argv[0] != "up" else []
        process = subprocess.Popen([sys.executable, "-m", "batchd.cli", *argv[:1], "--redis", self.url, *sharded,
                                    *argv[1:]],
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=self.tmp_path,
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
        try:
            wait_for_workers(self.url, count, timeout, self.processes, shards=self.shards)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.args}\n{p.log_path.read_text()}" for p in self.processes)

    def stop_all(self) -> None:
        stop_processes(self.processes, timeout_s=20)


@pytest.fixture
def daemons(redis_server, tmp_path):
    fleet = Daemons(redis_server.url, tmp_path)
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="module")
def echo_fleet(tmp_path_factory):
    """One redis-server, scheduler and echo worker shared by a module's tests (they must not
    change the fleet's settings)."""
    server = EmbeddedServer(binary=redis_binary()).start()
    fleet = Daemons(server.url, tmp_path_factory.mktemp("echo-fleet"))
    fleet.scheduler()
    fleet.echo_worker()
    fleet.wait_for_workers(1)
    yield fleet
    fleet.stop_all()
    server.cleanup()


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory):
    """A private redis-server and a Daemons on it shared by a module's tests, which start the
    daemons they need once."""
    server = EmbeddedServer(binary=redis_binary()).start()
    fleet = Daemons(server.url, tmp_path_factory.mktemp("module-fleet"))
    yield fleet
    fleet.stop_all()
    server.cleanup()


@pytest.fixture(scope="module")
def sentinel_fleet(tmp_path_factory):
    """A Sentinel set (1 master, 2 replicas, 3 sentinels) with a scheduler and an echo worker
    storing results durably (--durable-replicas 2) on its redis+sentinel:// URL, shared by a
    module's tests (they must not kill the master). fleet.sentinels is the SentinelSet."""
    sentinels = SentinelSet(redis_binary()).start()
    fleet = Daemons(sentinels.url, tmp_path_factory.mktemp("sentinel-fleet"))
    fleet.sentinels = sentinels
    try:
        fleet.scheduler()
        fleet.echo_worker("--durable-replicas", "2")
        fleet.wait_for_workers(1)
        yield fleet
    finally:
        fleet.stop_all()
        sentinels.cleanup()


@pytest.fixture
def fleet_on(tmp_path):
    """Daemons on a URL the test chooses (a cluster's, say), with a shard count; all stopped
    afterwards. Call it as fleet_on(url, shards)."""
    fleets: list[Daemons] = []

    def make(url: str, shards: int = 1) -> Daemons:
        fleets.append(Daemons(url, tmp_path, shards))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.stop_all()


@pytest.fixture
def server_binary() -> str:
    """redis-server on PATH (the tests' server everywhere), for harnesses that start their own."""
    return redis_binary()
