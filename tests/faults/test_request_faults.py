"""Faults that come with a request: poison, overload, deadlines, cancellation, a vanished caller."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from batchd import Client
from batchd.client.errors import DeadlineExceeded, Overloaded, WorkerFailed
from batchd.client import Delta
from batchd.client.protocol import decode_event

from .conftest import FAST_LEASE, KEYS, assert_serves_new_requests, kill, live_workers, wait_until

pytestmark = pytest.mark.slow


def batchd_status(url: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "batchd.cli", "status", "--redis", url, "--json"],
                         check=True, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


def test_poison_request_is_dead_lettered_after_max_attempts(redis_server, daemons, observer):
    """A request that takes its worker down every time ends as WorkerFailed, not a crash loop."""
    daemons.scheduler("--max-attempts", "2")
    worker = daemons.echo_worker("--token-delay-ms", "20", *FAST_LEASE)
    daemons.wait_for_workers(1)
    with Client(redis_server.url) as client:
        innocent = [client.submit(f"fine {i}") for i in range(5)]
        poison = client.submit("p" * 2000, request_id="poison")
        assert [h.result().text for h in innocent] == [f"fine {i}" for i in range(5)]
        for attempt in range(2):
            seen = observer.tokens["poison"]
            observer.wait_for_tokens("poison", seen + 5)
            kill(worker)  # the poison "crashes" whichever worker runs it
            worker = daemons.echo_worker("--token-delay-ms", "20", *FAST_LEASE)
        with pytest.raises(WorkerFailed, match="failed 2 times"):
            poison.result()
    observer.assert_exactly_once(["poison"] + [h.request_id for h in innocent])
    assert len(observer.restarts["poison"]) >= 1
    [(_, dead)] = observer.client.xrange(KEYS.dead_letters)
    assert dead[b"id"] == b"poison" and dead[b"error_type"] == b"worker_failed"
    assert batchd_status(redis_server.url)["dead_letters"] == 1
    assert_serves_new_requests(redis_server.url)


def test_full_queue_fails_submit_at_once_with_overloaded(redis_server, daemons, observer):
    daemons.scheduler("--max-queue", "5")  # and no worker: nothing drains
    probe = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: probe.hget(KEYS.config, "max_queue") == b"5", 10, "the scheduler to publish max_queue")
    with Client(redis_server.url) as client:
        queued = [client.submit(f"queued {i}") for i in range(5)]
        started = time.monotonic()
        with pytest.raises(Overloaded, match="full"):
            client.submit("one too many")
        assert time.monotonic() - started < 0.5
        assert probe.xlen(KEYS.requests) == 5  # the refused one was never enqueued
        daemons.echo_worker()
        assert [h.result().text for h in queued] == [f"queued {i}" for i in range(5)]
    observer.assert_exactly_once([h.request_id for h in queued])
    assert_serves_new_requests(redis_server.url)
    probe.close()


def test_deadline_before_start_costs_no_slot(redis_server, daemons, observer):
    daemons.scheduler()  # no worker yet
    with Client(redis_server.url) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="expired before"):
            client.submit("too late", timeout=0.3, request_id="too-late").result()
        assert time.monotonic() - started < 3
    assert observer.final("too-late").finish_reason == "deadline"
    assert not observer.client.keys(KEYS.jobs("*"))  # never dispatched
    observer.assert_exactly_once(["too-late"])


def test_deadline_during_decode_frees_the_slot_with_partial_text(redis_server, daemons, observer):
    daemons.scheduler()
    daemons.echo_worker("--token-delay-ms", "20", "--slots", "2", *FAST_LEASE)
    daemons.wait_for_workers(1)
    prompt = "d" * 300  # 6 s of decoding; the deadline comes after 0.6 s
    with Client(redis_server.url) as client:
        result = client.submit(prompt, timeout=0.6, request_id="slow").result()
        assert result.finish_reason == "deadline"
        assert 0 < len(result.text) < len(prompt) and prompt.startswith(result.text)
        wait_until(lambda: busy_slots(redis_server.url) == 0, 2, "the slot to be freed")
    observer.assert_exactly_once(["slow"])


def busy_slots(url: str) -> int:
    """Requests running or waiting in the engines, as the workers' heartbeats report them."""
    from batchd.status import read_status

    client = redis.Redis.from_url(url)
    try:
        return sum(w["running"] + w["waiting"] for w in read_status(client, KEYS)["workers"])
    finally:
        client.close()


@pytest.mark.parametrize("how", ["cancel", "stop-reading"])
def test_cancel_reaches_the_engine_within_a_step(redis_server, daemons, observer, how):
    daemons.scheduler()
    daemons.echo_worker("--token-delay-ms", "20", "--slots", "2", *FAST_LEASE)
    daemons.wait_for_workers(1)
    with Client(redis_server.url) as client:
        handle = client.submit("c" * 500, request_id="to-cancel")
        stream = iter(handle)
        deltas = [next(stream) for _ in range(3)]
        assert all(isinstance(d, Delta) for d in deltas)
        started = time.monotonic()
        if how == "cancel":
            handle.cancel()
        else:
            stream.close()  # the caller walked away mid-stream
        observer.wait_for_finals(["to-cancel"], timeout=5)
        took = time.monotonic() - started
    final = observer.final("to-cancel")
    assert final.finish_reason == "cancelled"
    assert took < 0.5, f"cancel took {took:.2f}s (a step is 20 ms)"
    assert 3 <= len(final.text) < 500
    wait_until(lambda: busy_slots(redis_server.url) == 0, 2, "the slot to be freed")
    observer.assert_exactly_once(["to-cancel"])


PRODUCER = """
import sys, time
from batchd import Client
client = Client(sys.argv[1], cancel_key="orphan's service")
for n, item in enumerate(client.stream("v" * 400, request_id="orphan")):
    if n == 3:
        print("streaming", flush=True)
        time.sleep(600)
"""


def test_client_killed_mid_stream_is_cancelled_and_gets_one_stored_outcome(redis_server, daemons, redis_client):
    # No Observer here: a subscriber to every result channel would count as a listener.
    daemons.scheduler()
    daemons.echo_worker("--token-delay-ms", "20", "--abandoned-after", "1", *FAST_LEASE)
    daemons.wait_for_workers(1)
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, redis_server.url], stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout.readline().strip() == "streaming"
        kill(producer)
    finally:
        if producer.poll() is None:
            producer.kill()
    killed = time.monotonic()
    # 400 tokens would take 8 s; nobody listens any more, so the worker stops after ~1 s.
    wait_until(lambda: redis_client.exists(KEYS.result("orphan")), 15, "the orphan's result")
    assert time.monotonic() - killed < 4
    final = decode_event(redis_client.get(KEYS.result("orphan"))).result
    assert final.finish_reason == "cancelled" and 3 <= len(final.text) < 400
    wait_until(lambda: busy_slots(redis_server.url) == 0, 2, "the slot to be freed")
    # A caller that comes back (same id, new process of the same service: the same cancel_key)
    # gets the stored outcome, not a second run.
    with Client(redis_server.url, cancel_key="orphan's service") as client:
        again = client.submit("v" * 400, request_id="orphan")
        assert again.result().finish_reason == "cancelled"
        assert client.fetch_result("orphan").text == final.text
    assert redis_client.hget(KEYS.stats, "requests_dispatched") == b"1"
    assert len(live_workers(redis_server.url)) == 1
    assert_serves_new_requests(redis_server.url)
