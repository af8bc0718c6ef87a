"""What every fault test needs: an observer that counts each request's final events.

A client's handle stops at the first final result, so it cannot see a second
one. The Observer subscribes to every result channel and counts final events
per request id, so "exactly one outcome" is checked on the wire.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict

import pytest
import redis

from batchd.client.keys import Keys
from batchd.client.protocol import FinalEvent, RestartEvent, TokenEvent, decode_event
from batchd.status import read_status

KEYS = Keys()

# Short leases so a dead worker is noticed in about two seconds.
FAST_LEASE = ("--lease-ms", "1500", "--heartbeat-interval", "0.3")


class Observer:
    """Counts the token, restart and final events published for every request."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe(KEYS.channel_pattern(""))
        self.finals: dict[str, list] = defaultdict(list)
        self.restarts: dict[str, list] = defaultdict(list)
        self.tokens: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._running = True
        while (message := self.pubsub.get_message(timeout=5)) is None or message["type"] != "psubscribe":
            pass
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self._running:
            try:
                message = self.pubsub.get_message(timeout=0.1)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.2)  # Redis restarting; redis-py resubscribes on reconnect
                continue
            if message is None or message["type"] != "pmessage":
                continue
            request_id = message["channel"].decode()[len(KEYS.channel("")):]
            event = decode_event(message["data"])
            with self._lock:
                if isinstance(event, FinalEvent):
                    self.finals[request_id].append(event.result)
                elif isinstance(event, RestartEvent):
                    self.restarts[request_id].append(event)
                elif isinstance(event, TokenEvent):
                    self.tokens[request_id] += len(event.token_ids)

    def wait_for_tokens(self, request_id: str, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.tokens[request_id] >= count, timeout, f"{count} tokens of {request_id}")

    def wait_for_finals(self, request_ids, timeout: float = 60.0) -> None:
        ids = list(request_ids)
        wait_until(lambda: all(self.finals.get(i) for i in ids), timeout,
                   lambda: f"final results of {sum(1 for i in ids if not self.finals.get(i))} of {len(ids)} requests")

    def assert_exactly_once(self, request_ids) -> None:
        """Every id has exactly one final event on the wire and one stored result."""
        ids = list(request_ids)
        time.sleep(0.5)  # a late duplicate would arrive now
        with self._lock:
            counts = {i: len(self.finals.get(i, [])) for i in ids}
        wrong = {i: n for i, n in counts.items() if n != 1}
        assert not wrong, f"{len(wrong)} requests did not get exactly one final event: {dict(list(wrong.items())[:10])}"
        stored = self.client.mget([KEYS.result(i) for i in ids])
        missing = [i for i, raw in zip(ids, stored) if raw is None]
        assert not missing, f"{len(missing)} requests have no stored result: {missing[:10]}"

    def final(self, request_id: str):
        return self.finals[request_id][0]

    def close(self) -> None:
        self._running = False
        self.thread.join(timeout=2)
        self.pubsub.close()
        self.client.close()


def wait_until(condition, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def live_workers(url: str) -> set[str]:
    client = redis.Redis.from_url(url)
    try:
        return {w["worker_id"] for w in read_status(client, KEYS)["workers"]}
    finally:
        client.close()


def kill(process, sig=signal.SIGKILL) -> None:
    os.kill(process.pid, sig)
    if sig == signal.SIGKILL:
        process.wait(timeout=10)


def assert_serves_new_requests(url: str, count: int = 5) -> None:
    """The system still answers fresh requests after the fault."""
    from batchd import Client

    with Client(url) as client:
        handles = [client.submit(f"after the fault {i}", timeout=20) for i in range(count)]
        assert [h.result().text for h in handles] == [f"after the fault {i}" for i in range(count)]


@pytest.fixture
def observer(redis_server):
    watcher = Observer(redis_server.url)
    yield watcher
    watcher.close()
