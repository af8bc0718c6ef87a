"""Schedulers killed with -9 while they hold undispatched requests, and Redis restarts."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import redis

from batchd import Client
from batchd.client.keys import SCHEDULER_GROUP
from batchd.embedded import EmbeddedServer

from .conftest import FAST_LEASE, KEYS, Observer, assert_serves_new_requests, kill, wait_until

pytestmark = pytest.mark.slow


def test_kill_9_scheduler_holding_a_batch_loses_nothing(redis_server, daemons, observer):
    # A long batch window keeps requests held (read, not yet dispatched) when the kill comes.
    hold = ("--max-wait-ms", "2500", "--max-batch", "1000", "--claim-idle-ms", "2000")
    schedulers = [daemons.scheduler(*hold), daemons.scheduler(*hold)]
    daemons.echo_worker(*FAST_LEASE)
    daemons.wait_for_workers(1)
    probe = redis.Redis.from_url(redis_server.url)
    with Client(redis_server.url) as client:
        ids = [client.submit(f"held {i}", request_id=f"held-{i}").request_id for i in range(30)]
        wait_until(lambda: probe.xpending(KEYS.requests, SCHEDULER_GROUP)["pending"] == 30, 10,
                   "both schedulers to read the requests")
        holders = {c["name"].decode(): c["pending"] for c in probe.xinfo_consumers(KEYS.requests, SCHEDULER_GROUP)}
        victim_name = max(holders, key=holders.get)
        assert holders[victim_name] > 0
        victim = next(s for s in schedulers if f"-{s.pid}-" in victim_name)
        kill(victim)
        observer.wait_for_finals(ids, timeout=30)
    observer.assert_exactly_once(ids)
    assert all(observer.final(i).text == f"held {n}" for n, i in enumerate(ids))
    assert "claimed" in next(s for s in schedulers if s is not victim).log_path.read_text()
    probe.close()
    assert_serves_new_requests(redis_server.url)


@pytest.fixture
def aof_server(tmp_path):
    """A redis-server with AOF fsynced on every write, restartable on the same port and files."""
    data = tmp_path / "redis-data"
    data.mkdir()
    server = EmbeddedServer(binary=shutil.which("redis-server"), appendonly=True, data_dir=str(data),
                            extra_args=["--appendfsync", "always"]).start()
    yield server
    server.stop()


def test_redis_restart_with_aof_loses_no_request(aof_server, daemons):
    fleet = daemons
    fleet.url = aof_server.url  # not the fixture's plain server
    observer = Observer(aof_server.url)
    try:
        fleet.scheduler()
        fleet.echo_worker("--token-delay-ms", "20", *FAST_LEASE)
        fleet.wait_for_workers(1)
        with Client(aof_server.url) as client:
            handles = [client.submit("y" * 80, request_id=f"before-{i}", timeout=60) for i in range(30)]
            observer.wait_for_tokens("before-0", 10)
            aof_server.stop(kill=True)  # crash mid-decode, not a clean shutdown
            during = {}
            submitter = threading.Thread(target=lambda: during.update(
                handle=client.submit("submitted while Redis was down", request_id="during", timeout=60)))
            submitter.start()
            time.sleep(1.5)
            aof_server.start()
            submitter.join(timeout=30)
            assert "handle" in during, "submit did not ride out the restart"
            handles.append(during["handle"])
            results = [h.result() for h in handles]
        assert [r.text for r in results[:-1]] == ["y" * 80] * 30
        assert results[-1].text == "submitted while Redis was down"
        ids = [h.request_id for h in handles]
        # Publishes made while the observer was disconnected are gone; none may be doubled.
        assert all(len(observer.finals.get(i, [])) <= 1 for i in ids)
        assert all(raw is not None for raw in observer.client.mget([KEYS.result(i) for i in ids]))
        assert all(p.poll() is None for p in fleet.processes), fleet.logs()
        assert_serves_new_requests(aof_server.url)
    finally:
        observer.close()
        fleet.stop_all()
