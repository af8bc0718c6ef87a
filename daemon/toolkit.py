"""What both daemons do the same way, so each rule has one definition.

The run loop with its backoff, creating a consumer group, the settings the
schedulers publish in Redis for everyone, reading a job stream entry (a bad one
is dropped, never fatal), and the errors of a request that ended before it
started.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import msgspec
import redis

from batchd.client.connection import CONNECTION_LOST, Backoff, is_cluster
from batchd.client.errors import BatchdError, Cancelled, DeadlineExceeded
from batchd.client.keys import Keys
from batchd.client.protocol import FinishReason, Job, Request, decode_job

log = logging.getLogger("batchd.daemon")

# Redis checks blocked commands' timeouts once per server tick (1000 / hz ms at the
# default hz 10): a BLOCK shorter than this waits for the tick anyway.
SERVER_TICK_MS = 100
# A request whose worker died this many times is dead-lettered (--max-attempts).
DEFAULT_MAX_ATTEMPTS = 3
# A daemon whose Redis is gone retries at 0.1 s, doubling up to this.
RECONNECT_BACKOFF_CAP_S = 5.0


def instance_id() -> str:
    """A daemon's default id: host, pid and a random suffix, readable in logs and `batchd status`."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class DaemonConfig:
    """Settings every daemon has."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "batchd:"
    # Request shards (Keys.shards): every process of a fleet must be started with the same number.
    shards: int = 1
    # How long a final result stays readable at batchd:result:{id}.
    result_ttl_s: int = 3600
    metrics_port: int = 0
    # Where /metrics listens: all interfaces by default, 127.0.0.1 to keep it on the host.
    metrics_host: str = "0.0.0.0"


def run_until_stopped(stop: threading.Event, run_once: Callable[[], None], reconnect: Callable[[], None]) -> None:
    """Call run_once until stop is set. Nothing stops the loop but stop: while Redis is
    unreachable or answers errors (BUSY during a long script, WRONGTYPE on a key someone
    overwrote, a stream deleted under a blocked read), back off and reconnect, which also
    repairs what the daemon owns; a bug in one iteration is logged with its traceback."""
    backoff = Backoff(cap_s=RECONNECT_BACKOFF_CAP_S)
    while not stop.is_set():
        try:
            run_once()
            backoff.reset()
        except CONNECTION_LOST as exc:
            _back_off(stop, backoff, "Redis unreachable (%s)", exc)
            reconnect()
        except redis.RedisError as exc:
            _back_off(stop, backoff, "Redis answered an error (%s)", exc)
            reconnect()
        except Exception:
            log.exception("unexpected error in the daemon loop; carrying on")
            _back_off(stop, backoff, "after an unexpected error%s", "")
            reconnect()


def _back_off(stop: threading.Event, backoff: Backoff, message: str, detail) -> None:
    delay = backoff.next_delay()
    log.warning(message + "; retrying in %.1fs", detail, delay)
    stop.wait(delay)


def supervise(name: str, loop: Callable[[], None], done: threading.Event) -> threading.Thread:
    """Run loop on a daemon thread until done is set; an exception restarts it after a backoff
    (logged), so a background thread of a daemon never silently dies."""
    def run() -> None:
        backoff = Backoff(cap_s=RECONNECT_BACKOFF_CAP_S)
        while not done.is_set():
            try:
                loop()
                return
            except Exception:
                log.exception("thread %s failed; restarting it", name)
                done.wait(backoff.next_delay())

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def repair_keys(client: redis.Redis, expected: dict[str, str]) -> None:
    """Delete each key that holds another type than the one batchd keeps there (a SET on the
    request stream, say), so the daemon's setup can recreate it; logged as an error, since
    whatever the key held is lost either way."""
    for key, kind in expected.items():
        found = client.type(key)
        found = found.decode() if isinstance(found, bytes) else found
        if found not in (kind, "none"):
            log.error("%s is a %s, not a %s: someone overwrote it; deleting it so it can be recreated",
                      key, found, kind)
            client.delete(key)


# On Redis Cluster one XREADGROUP reads streams of one slot only, so a daemon reading several
# shards' streams asks each in one pipeline and cannot block on all of them at once: while
# nothing comes it polls instead (docs/deploy.md, "Redis Cluster"), every 2 ms at first and,
# as empty reads go on, less often down to every 16 ms: an idle fleet then costs each daemon
# ~60 pipelines a second instead of 500, and the first request after a quiet spell waits at
# most 16 ms more to be read.
CLUSTER_POLL_MS, CLUSTER_IDLE_POLL_MS = 2, 16


class ClusterPoll:
    """One daemon's wait between empty reads of its streams on a cluster (see CLUSTER_POLL_MS)."""

    def __init__(self) -> None:
        self.next_ms = CLUSTER_POLL_MS

    def after(self, got_any: bool, block_ms: int | None) -> None:
        """Called after each read: sleeps out a block that found nothing, longer each time."""
        if got_any:
            self.next_ms = CLUSTER_POLL_MS
        elif block_ms:
            time.sleep(min(block_ms, self.next_ms) / 1000)
            self.next_ms = min(self.next_ms * 2, CLUSTER_IDLE_POLL_MS)


def read_streams(client: redis.Redis, group: str, consumer: str, positions: dict[str, str], count: int,
                 block_ms: int | None = None, poll: ClusterPoll | None = None) -> list:
    """XREADGROUP of several streams, as a list of (stream, entries); on a cluster, one read
    per stream in one round trip, and a sleep (poll's, else CLUSTER_POLL_MS) for a block when
    all came back empty."""
    if len(positions) == 1 or not is_cluster(client):
        return client.xreadgroup(group, consumer, positions, count=count, block=block_ms) or []
    with client.pipeline(transaction=False) as pipe:
        for stream, position in positions.items():
            pipe.xreadgroup(group, consumer, {stream: position}, count=count)
        replies = pipe.execute(raise_on_error=False)
    merged = merge_reads(replies)
    (poll or ClusterPoll()).after(bool(merged), block_ms)
    return merged


def mget_any(client: redis.Redis, keys: list[str]) -> list:
    """MGET of keys in any slots: a cluster answers an MGET of one slot only, and its client
    splits one by slot (mget_nonatomic: no snapshot across slots, which no caller here needs)."""
    return client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)


def merge_reads(replies: list) -> list:
    """Per-stream XREADGROUP replies as one (the first error raised)."""
    merged = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        merged.extend(reply or ())
    return merged


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and its stream) unless it exists already."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("created consumer group %s on %s", group, stream)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def publish_settings(client: redis.Redis, keys: Keys, *, max_queue: int, max_attempts: int) -> int | None:
    """The settings schedulers own and every side reads: SUBMIT bounds the backlog by
    max_queue, a worker handing a request back dead-letters it after max_attempts. Written to
    every shard's config hash, since SUBMIT reads the one in its shard. The shard count goes
    to the untagged config hash too (Keys.fleet_config), where a producer or worker of any
    --shards finds it and refuses to run on another (WrongShards).
    Returns the shard count that stood there before (None: none, or unreadable), so a
    scheduler hears of another scheduler of the fleet running another --shards."""
    settings = {"max_queue": max_queue, "max_attempts": max_attempts, "shards": keys.shards}
    with client.pipeline(transaction=False) as pipe:
        pipe.hget(keys.fleet_config, "shards")
        for shard in range(keys.shards):
            pipe.hset(keys.config_in(shard), mapping=settings)
        if keys.fleet_config != keys.config_in(0):
            pipe.hset(keys.fleet_config, "shards", keys.shards)
        before = pipe.execute()[0]
    try:
        return None if before is None else int(before)
    except ValueError:
        return None


# A shard whose schedulers all stopped marking it read this long ago is reported unread.
UNREAD_AFTER_S = 10.0


def mark_shards_read(client: redis.Redis, keys: Keys, reading: Iterable[int], now_s: float) -> list[int]:
    """Note in each shard's config hash that this scheduler reads it (`read_at`, seconds on
    the broker's clock), and return the shards nobody has noted within UNREAD_AFTER_S:
    schedulers started with --read-shards may leave one out, and its requests would wait
    for ever without a word."""
    with client.pipeline(transaction=False) as pipe:
        for shard in reading:
            pipe.hset(keys.config_in(shard), "read_at", f"{now_s:.3f}")
        for shard in range(keys.shards):
            pipe.hget(keys.config_in(shard), "read_at")
        marks = pipe.execute()[-keys.shards:]
    unread = []
    for shard, mark in enumerate(marks):
        try:
            if mark is None or now_s - float(mark) > UNREAD_AFTER_S:
                unread.append(shard)
        except ValueError:
            unread.append(shard)
    return unread


def read_max_attempts(client: redis.Redis, keys: Keys) -> int:
    """The schedulers' --max-attempts; the default before any scheduler published one."""
    try:
        value = client.hget(keys.config_in(0), "max_attempts")
        return max(1, int(value)) if value is not None else DEFAULT_MAX_ATTEMPTS
    except (ValueError, redis.ResponseError):  # unreadable or the wrong type: schedulers rewrite it
        return DEFAULT_MAX_ATTEMPTS


def read_job(entry_id: str, fields: dict, whose: str) -> Job | None:
    """The job in one job stream entry, or None (logged) when it cannot be read."""
    try:
        return decode_job(fields[b"job"])
    except (KeyError, msgspec.MsgspecError, BatchdError) as exc:
        log.warning("dropping unreadable job %s of %s: %s", entry_id, whose, exc)
        return None


def cancelled_before_start(request_id: str) -> Cancelled:
    return Cancelled(f"request {request_id} was cancelled before it started", request_id)


def expired_before_start(request_id: str, waiting_for: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"request {request_id} expired before {waiting_for}; "
                            "raise its timeout or add workers", request_id)


def finish_reason_of(error: BatchdError) -> FinishReason:
    """The finish_reason of a request that ended with this error before it produced anything."""
    return {"cancelled": "cancelled", "deadline_exceeded": "deadline"}.get(error.code, "error")


def cancel_matches(request: Request, secret: bytes | str | None) -> bool:
    """Whether a cancel presenting this secret (a cancel flag's value, or the one its broadcast
    carried) stops the request: it hashes to the request's cancel_hash, or the request has none
    (a producer that predates it: anyone who knows the id may cancel it)."""
    if secret is None:
        return False
    if request.cancel_hash is None:
        return True
    if isinstance(secret, str):
        secret = secret.encode()
    return hmac.compare_digest(hashlib.sha1(secret).hexdigest(), request.cancel_hash)
