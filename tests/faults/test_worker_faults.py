"""Workers that die (kill -9) or freeze past their lease (SIGSTOP) mid-batch.

Real redis-server, real scheduler and worker processes, echo engine with a
per-token delay so requests are mid-decode when the fault hits.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time

import pytest
import redis

from batchd import Client
from batchd.client import Delta, StreamRestarted

from .conftest import FAST_LEASE, KEYS, assert_serves_new_requests, kill, live_workers, wait_until

pytestmark = pytest.mark.slow

PROMPT = "x" * 60  # 60 tokens at 20 ms: 1.2 s of decoding


def start_two_workers(daemons, faulty_id: str):
    doomed = daemons.echo_worker("--token-delay-ms", "20", "--worker-id", faulty_id, *FAST_LEASE)
    daemons.echo_worker("--token-delay-ms", "20", "--worker-id", "survivor", *FAST_LEASE)
    daemons.wait_for_workers(2)
    return doomed


def submit_batch(client: Client, count: int) -> list[str]:
    return [client.submit(PROMPT, request_id=f"req-{i}").request_id for i in range(count)]


def wait_until_running_on(redis_server, observer, worker_id: str, ids: list[str]) -> None:
    """The worker holds an unfinished job and its requests are streaming."""
    probe = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: probe.xlen(KEYS.jobs(worker_id)) > 0 and sum(observer.tokens[i] for i in ids) > 40,
               20, f"requests running on {worker_id}")
    probe.close()


def read_streams(handles) -> dict[str, list]:
    """Everything each caller's stream yields, read in a thread while the fault happens."""
    streams: dict[str, list] = {}

    def read() -> None:
        for handle in handles:
            streams[handle.request_id] = list(handle)

    reader = threading.Thread(target=read)
    reader.start()
    streams["_reader"] = reader  # type: ignore[assignment]
    return streams


def test_kill_9_worker_mid_batch_redispatches_its_requests(redis_server, daemons, observer):
    daemons.scheduler()
    doomed = start_two_workers(daemons, "doomed")
    with Client(redis_server.url) as client:
        handles = [client.submit(PROMPT, request_id=f"req-{i}") for i in range(40)]
        ids = [h.request_id for h in handles]
        streams = read_streams(handles)
        wait_until_running_on(redis_server, observer, "doomed", ids)
        kill(doomed)
        observer.wait_for_finals(ids, timeout=30)
        streams.pop("_reader").join(timeout=30)
    observer.assert_exactly_once(ids)
    # Each caller's stream continued where it stopped: the re-run's repeated tokens were
    # swallowed (echo decoding is deterministic), so no restart and no text twice.
    for request_id, items in streams.items():
        deltas = [item for item in items if isinstance(item, Delta)]
        assert not [item for item in items if isinstance(item, StreamRestarted)], request_id
        assert "".join(d.text for d in deltas) == PROMPT, request_id
        assert [d.index for d in deltas] == list(itertools.accumulate([0] + [len(d.token_ids) for d in deltas[:-1]]))
    results = [observer.final(i) for i in ids]
    assert all(r.text == PROMPT and r.finish_reason == "stop" for r in results)
    moved = [r for r in results if r.attempt == 1]
    assert moved, "no request was running on the killed worker"
    assert all(r.worker == "survivor" for r in moved)
    assert all(observer.restarts[r.request_id] for r in moved)  # the wire carries the restart
    assert any(observer.tokens[r.request_id] > len(PROMPT) for r in moved)  # and tokens that were repeated
    assert live_workers(redis_server.url) == {"survivor"}
    assert_serves_new_requests(redis_server.url)


def test_worker_paused_past_its_lease_is_fenced_when_it_wakes(redis_server, daemons, observer):
    daemons.scheduler()
    paused = start_two_workers(daemons, "paused")
    probe = redis.Redis.from_url(redis_server.url)
    with Client(redis_server.url) as client:
        ids = submit_batch(client, 40)
        wait_until_running_on(redis_server, observer, "paused", ids)
        kill(paused, signal.SIGSTOP)
        try:
            # Reaped: its job stream is gone and its requests run on the survivor.
            wait_until(lambda: not probe.exists(KEYS.jobs("paused")), 15, "the paused worker to be reaped")
            time.sleep(0.5)
        finally:
            kill(paused, signal.SIGCONT)
        observer.wait_for_finals(ids, timeout=30)
    observer.assert_exactly_once(ids)
    results = [observer.final(i) for i in ids]
    assert all(r.text == PROMPT for r in results)
    assert any(r.attempt == 1 for r in results)
    assert all(r.worker == "survivor" for r in results if r.attempt == 1)
    # The woken worker notices, drops what it lost, and serves again.
    wait_until(lambda: live_workers(redis_server.url) == {"paused", "survivor"}, 10, "the woken worker to rejoin")
    assert paused.poll() is None
    assert_serves_new_requests(redis_server.url, count=20)
    assert "presumed dead" in paused.log_path.read_text()
    probe.close()
