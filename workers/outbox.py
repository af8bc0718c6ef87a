"""The worker's outbox: everything it tells Redis, one round trip at a time, and the one
owner of what was sent but is not booked yet.

A parcel carries one step's token events (one PUBLISH_STEP call per lease
token), its final results (one FINALIZE each; the one that completes a job
acknowledges the job in the same call, after the store), a heartbeat when one is
due, and a read of the next jobs. The round trip runs in order, so a request's
last tokens reach its channel before its final event.

post() sends a parcel from the publisher thread while the loop runs the next
engine step (on a GPU the host would otherwise wait on Redis while the device
idles); collect() waits for it and hands back its receipt, which the loop books
before it builds the next parcel. So at most one parcel is in flight and each
is built from booked state. A parcel whose connection dropped leaves its final
results here until the loop sends them again after the reconnect.

The outbox owns its connection: the publisher thread and the loop use it in
turn, never at once.

With durable_replicas, a parcel that stored results is booked only once that many
replicas acknowledged them (WAIT); otherwise its results stay here and are stored
again after the backoff (FINALIZE is idempotent: one already stored answers 0), so a
failover cannot take an acknowledged job's result with it.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
import redis

from batchd.client.connection import CONNECTION_LOST, is_cluster, is_moved, master_client, relearn_slots
from batchd.client.core import DURABLE_WAIT_MS, not_durable
from batchd.client.keys import WORKER_GROUP, Keys, parse_job_ref
from batchd.client.tokenizers import TOKENIZER_TTL_MS
from batchd.client.protocol import Heartbeat, Request, Result, TokenEvent, encode, seal_event, seal_final
from batchd.client.scripts import ScriptCall, needs_loading, raise_any_error, run_in_pipeline
from batchd.daemon import scripts

from .holdings import Held

# How long a full-vector result is kept once a subscriber heard its cue (FINALIZE): its caller
# reads it on the cue, within milliseconds; the rest of --scoring-result-ttl only held memory
# (an SMC run's Redis peak was mostly these: docs/integrations.md). A caller that was not
# listening when its result came (reconnecting) still finds it for the whole TTL.
CUE_READ_WINDOW_S = 2


@dataclass
class Parcel:
    """What one round trip carries."""

    events: list[tuple[Held, TokenEvent]] = field(default_factory=list)
    finished: list[tuple[Held, Result]] = field(default_factory=list)
    # Job entry -> the request whose result completes it (and acknowledges it).
    closes: dict[str, Held] = field(default_factory=dict)
    beat: Heartbeat | None = None
    # Also read up to this many new jobs (0: none).
    read_jobs: int = 0


@dataclass
class Receipt:
    """What a parcel's round trip came back with, for the loop to book."""

    parcel: Parcel
    # Each token event's request and how many subscribers received it (-1: not published, lease gone).
    heard: list[tuple[Held, int]]
    # FINALIZE's outcome for each finished request: 1 delivered, 0 already delivered, -1 fenced.
    outcomes: list[int]
    # The job read's reply (a ResponseError such as NOGROUP comes back as the reply), or None.
    jobs: Any


class Outbox:
    def __init__(self, client: redis.Redis, keys: Keys, worker_id: str, result_ttl_s: int, lease_ms: int,
                 kept_alive: list[str] = (), scoring_result_ttl_s: int | None = None, durable_replicas: int = 0):
        """kept_alive: keys whose expiry each heartbeat pushes back (the served tokenizer's);
        scoring_result_ttl_s: how long scoring results stay stored (None: result_ttl_s);
        durable_replicas: replicas that must hold a result before its job is acknowledged."""
        self.redis = client
        self.durable_replicas = durable_replicas
        self.keys = keys
        self.worker_id = worker_id
        self.streams = keys.job_streams(worker_id)
        self.result_ttl_s = result_ttl_s
        self.scoring_result_ttl_s = result_ttl_s if scoring_result_ttl_s is None else scoring_result_ttl_s
        self.lease_ms = lease_ms
        self.kept_alive = list(kept_alive)
        self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchd-publish")
        self._in_flight: tuple[Parcel, concurrent.futures.Future] | None = None
        # Final results whose round trip failed: stored first thing once Redis is back.
        self._undelivered: list[tuple[Held, Result]] = []

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def send(self, parcel: Parcel) -> Receipt:
        """Send a parcel now, from the calling thread; nothing may be in flight."""
        calls = self._calls(parcel)
        return self._receipt(parcel, lambda: self._round_trip(parcel, calls))

    def post(self, parcel: Parcel) -> None:
        """Send a parcel from the publisher thread; collect() returns its receipt."""
        calls = self._calls(parcel)  # encoded here: the publisher thread only waits on Redis
        self._in_flight = (parcel, self._publisher.submit(self._round_trip, parcel, calls))

    def collect(self) -> Receipt | None:
        """Wait for the parcel in flight, if any, and return its receipt."""
        if self._in_flight is None:
            return None
        parcel, future = self._in_flight
        self._in_flight = None
        return self._receipt(parcel, future.result)

    def keep(self, finished: list[tuple[Held, Result]]) -> None:
        """Final results that could not be sent now: stored first thing once Redis is back."""
        self._undelivered.extend(finished)

    def take_undelivered(self) -> list[tuple[Held, Result]]:
        undelivered, self._undelivered = self._undelivered, []
        return undelivered

    def forget_undelivered(self) -> None:
        """Drop the kept results: a scheduler took their requests back, so they are fenced."""
        self._undelivered = []

    def close(self) -> None:
        self._publisher.shutdown(wait=True)

    def _receipt(self, parcel: Parcel, wait: Callable[[], Receipt]) -> Receipt:
        """wait()'s receipt; if the connection dropped, the parcel's results are kept to send again."""
        try:
            return wait()
        except redis.RedisError:  # a lost connection, or BUSY: nothing of the parcel is booked
            self.keep(parcel.finished)
            raise

    def _calls(self, parcel: Parcel) -> list[ScriptCall]:
        calls = [scripts.publish_step_call(self.keys, owner, [(held.request.id, seal_event(event, held.request)) for held, event in group])
                 for (owner, _shard), group in _by_owner(parcel.events).items()]
        for held, result in parcel.finished:
            closes = parcel.closes.get(held.job_entry) is held
            scoring = held.request.task != "generate"
            cue = _cue(result, held.request)
            calls.append(scripts.finalize_call(self.keys, held.request.id, seal_final(result, held.request),
                                               self.scoring_result_ttl_s if scoring else self.result_ttl_s, held.owner,
                                               self._ack_of(held.job_entry) if closes else None,
                                               cue=cue, cue_read_window_s=CUE_READ_WINDOW_S))
        return calls

    def _ack_of(self, job: str) -> tuple[str, str, str]:
        """FINALIZE's ack of the job a result completes: on its shard's job stream."""
        shard, entry_id = parse_job_ref(job)
        return self.streams[shard], WORKER_GROUP, entry_id

    def _round_trip(self, parcel: Parcel, calls: list[ScriptCall]) -> Receipt:
        def beat_and_read(pipe) -> None:
            if parcel.beat is not None:
                pipe.set(self.keys.heartbeat(self.worker_id), encode(parcel.beat), px=self.lease_ms)
                pipe.zadd(self.keys.workers, {self.worker_id: parcel.beat.sent_at})
                for key in self.kept_alive:
                    pipe.pexpire(key, TOKENIZER_TTL_MS)
            if parcel.read_jobs:
                for read in reads:
                    pipe.xreadgroup(WORKER_GROUP, self.worker_id, read, count=parcel.read_jobs)

        # On a cluster, one read per shard's job stream (a read spans one slot).
        reads = ([{stream: ">"} for stream in self.streams] if is_cluster(self.redis) and len(self.streams) > 1
                 else [{stream: ">" for stream in self.streams}])
        # On a cluster, durable results go to their masters directly (_store_durably_on_cluster).
        on_cluster = bool(self.durable_replicas and parcel.finished and is_cluster(self.redis))
        finals_from = len(calls) - len(parcel.finished)
        outcomes, replies = run_in_pipeline(self.redis, calls[:finals_from] if on_cluster else calls, beat_and_read)
        jobs = replies[-len(reads):] if parcel.read_jobs else None
        for reply in (*(jobs or ()), *outcomes):
            if isinstance(reply, CONNECTION_LOST):
                raise reply
        if jobs is not None:
            jobs = jobs[0] if len(jobs) == 1 else _merged(jobs)
        raise_any_error(outcomes)
        if on_cluster:
            outcomes = [*outcomes, *self._store_durably_on_cluster(calls[finals_from:])]
        elif self.durable_replicas and parcel.finished:
            self._wait_for_replicas(len(parcel.finished))
        groups = list(_by_owner(parcel.events).values())
        heard = [(held, listeners) for group, counts in zip(groups, outcomes)
                 for (held, _event), listeners in zip(group, counts)]
        return Receipt(parcel, heard, outcomes[len(groups):], jobs)


    def _store_durably_on_cluster(self, calls: list[ScriptCall]) -> list:
        """FINALIZE calls on a cluster with durable_replicas: per master of their shards, one
        pipeline of them and then WAIT, on a connection to that master (WAIT counts the writes of
        its own connection; the cluster client would send it to any node). Raises, so the parcel
        is kept and sent again, when a master or its replicas fall short."""
        by_master: dict[int, tuple[Any, list[int]]] = {}
        for index, (_script, keys, _args) in enumerate(calls):
            master = master_client(self.redis, keys[0])
            by_master.setdefault(id(master), (master, []))[1].append(index)
        outcomes: list = [None] * len(calls)
        for master, indices in by_master.values():
            for _attempt in range(2):  # a master that lost its scripts gets them, then the calls again
                try:
                    with master.pipeline(transaction=False) as pipe:
                        for i in indices:
                            calls[i][0].queue(pipe, calls[i][1], calls[i][2])
                        pipe.wait(self.durable_replicas, DURABLE_WAIT_MS)
                        replies = pipe.execute(raise_on_error=False)
                except CONNECTION_LOST:
                    relearn_slots(self.redis)  # the master died: the retry finds its successor
                    raise
                missing = {calls[i][0] for i, reply in zip(indices, replies) if needs_loading(reply)}
                if not missing:
                    break
                for script in missing:
                    master.script_load(script.source)
            if any(is_moved(reply) for reply in replies):
                relearn_slots(self.redis)  # a slot moved: learn where before the retry
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            if replies[-1] < self.durable_replicas:
                raise not_durable(replies[-1], self.durable_replicas, f"{len(indices)} stored results")
            for i, reply in zip(indices, replies):
                outcomes[i] = reply
        return outcomes

    def _wait_for_replicas(self, results: int) -> None:
        """Raise unless durable_replicas replicas hold what this connection wrote. A command of
        its own, after any script the pipeline had to load and run again: WAIT counts the writes
        of the connection it runs on, and this client's pool hands its one user the same
        connection back (redis-py's pool is last-in, first-out)."""
        acknowledged = self.redis.wait(self.durable_replicas, DURABLE_WAIT_MS)
        if acknowledged < self.durable_replicas:
            raise not_durable(acknowledged, self.durable_replicas, f"{results} stored results")


def _merged(replies: list):
    """Per-stream XREADGROUP replies as one; an error reply (NOGROUP: reaped) as itself."""
    errors = [reply for reply in replies if isinstance(reply, Exception)]
    return errors[0] if errors else [item for reply in replies for item in (reply or ())]


def _by_owner(events: list[tuple[Held, TokenEvent]]) -> dict[str, list[tuple[Held, TokenEvent]]]:
    """Events grouped by lease token and shard, in order: one PUBLISH_STEP call per token (requests
    of one attempt share it) and shard (a script touches one shard's keys)."""
    groups: dict[tuple[str, int], list[tuple[Held, TokenEvent]]] = {}
    for held, event in events:
        groups.setdefault((held.owner, held.shard), []).append((held, event))
    return groups


def _cue(result: Result, request: Request) -> bytes:
    """The final event to publish for a result whose stored copy holds a full next-token vector:
    the same without the vector, sealed like the stored one (b"": publish the stored event). A
    caller expecting a vector reads the stored result on it, so the vector crosses the network
    twice instead of three times; a sealed cue is still the fleet's word that the request ended."""
    if result.logprobs is None:
        return b""
    return seal_final(msgspec.structs.replace(result, logprobs=None), request)
