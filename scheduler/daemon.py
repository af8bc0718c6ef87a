"""The scheduler daemon: reads requests, forms batches, dispatches jobs.

Any number of schedulers run as one consumer group on every request stream (the shared
one and each tenant's: scheduler/streams.py).
A request stays pending in its scheduler's entry list until the job that
carries it is on a worker's stream; both happen in one script (DISPATCH), so a
scheduler killed at any point loses nothing: its pending entries go idle and
another scheduler claims them. The scheduler also re-dispatches the jobs of workers
whose heartbeat expired.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import msgspec
import redis

from batchd.client.connection import connect, describe, is_cluster
from batchd.client.errors import BatchdError, InvalidRequest, Overloaded, UnknownModel, WorkerFailed
from batchd.client.keys import SCHEDULER_GROUP, Keys, parse_last_reads, parse_stream_id, tenant_of, uses_shard_channels
from batchd.client.protocol import (
    PROTOCOL_VERSION,
    FinalEvent,
    Job,
    Request,
    decode_heartbeat,
    decode_request,
    encode,
    error_result,
    is_request_id,
    models_served,
    seal_final,
)
from batchd.client.core import overloaded_message
from batchd.client.scripts import LIBRARY, load_library, run_in_pipeline
from batchd.daemon import metrics, recovery, scripts
from batchd.daemon.toolkit import (
    DEFAULT_MAX_ATTEMPTS,
    SERVER_TICK_MS,
    UNREAD_AFTER_S,
    ClusterPoll,
    DaemonConfig,
    cancel_matches,
    cancelled_before_start,
    ensure_group,
    expired_before_start,
    finish_reason_of,
    instance_id,
    mark_shards_read,
    mget_any,
    publish_settings,
    read_job,
    read_streams,
    repair_keys,
    run_until_stopped,
)

from . import policy
from .policy import BatchPolicy, ModelBatchers, WorkerCapacity, pick_worker
from .streams import RequestStreams, by_stream

log = logging.getLogger("batchd.scheduler")

# While no worker has room, held requests are checked for deadlines and cancels this often.
SWEEP_INTERVAL_S = 0.1

# How often group consumers of dead schedulers are looked for, and how long one must be idle.
CONSUMER_SWEEP_INTERVAL_S = 30.0
DEAD_CONSUMER_IDLE_S = 300.0

# Seconds a worker's heartbeat must stay gone before its jobs are reaped.
REAP_GRACE_S = 0.9
# Seconds a model stays known after its last worker's heartbeat went: requests naming it
# wait meanwhile instead of failing UnknownModel (a heartbeat late under load, a worker
# restarting). A busy CPU worker's late heartbeat failed requests a moment after
# `models()` listed its model (tests/test_routing.py, seen twice).
MODEL_GRACE_S = 30.0

# A batch window counts from when the first request reached Redis (its entry id),
# not from when this scheduler woke up to read it, so the hop is not added to
# max_wait_ms. The broker's clock is mapped onto ours from TIME; a request is
# credited at most this much transit, which bounds the effect of a bad clock
# estimate or of an entry id chosen by a producer.
MAX_TRANSIT_CREDIT_S = 0.002
# How late the OS timer wakes a sleeping thread, about; the scheduler spins this last bit of a window.
TIMER_SLACK_S = 0.0002
# Clock samples from a round trip slower than this are too loose to keep.
CLOCK_SAMPLE_MAX_RTT_S = 0.002
# What a request expired waiting for, as its caller reads it.
WAITING_FOR = "a worker could take it"
# Entries beyond their tenants' max_queue answered Overloaded per housekeeping round, shared by
# the streams past it: answering costs the scheduler about 0.28 ms an entry, time no batch is
# dispatched in (docs/security.md, "Limits").
OVERFLOW_BUDGET = 500


@dataclass
class SchedulerConfig(DaemonConfig):
    max_batch: int = 32
    max_wait_ms: float = 5.0
    # Backlog beyond which submits fail with Overloaded (0: unbounded).
    max_queue: int = 100_000
    # Requests one scheduler holds undispatched; bounds its memory and lets
    # priority and fair share look past the head of the stream.
    read_ahead: int = 4096
    # A pending request idle this long belongs to a dead scheduler.
    claim_idle_ms: int = 10_000
    # A request whose worker died this many times is dead-lettered; published in the
    # config hash, so workers that hand requests back count against the same limit.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    # The request shards this scheduler reads (None: all of them). Schedulers may split a
    # sharded fleet's streams between them; every shard needs at least one reader.
    read_shards: tuple[int, ...] | None = None
    scheduler_id: str = field(default_factory=instance_id)

    def describe(self) -> str:
        shown = {k: v for k, v in asdict(self).items() if k != "redis_url"}
        return f"redis={describe(self.redis_url)} " + " ".join(f"{k}={v}" for k, v in shown.items())


@dataclass
class _Held:
    """A request this scheduler read and has not dispatched yet."""

    entry_id: str
    request: Request
    data: bytes
    stream: str


class Scheduler:
    def __init__(self, config: SchedulerConfig, client: redis.Redis | None = None, clock=time.time):
        self.config = config
        self.redis = client or connect(config.redis_url)
        self.keys = Keys(config.prefix, config.shards,
                         shard_channels=uses_shard_channels(is_cluster(self.redis), config.shards))
        self.clock = clock
        # One batcher per model a request names: a job carries one model's requests.
        self.batcher: ModelBatchers[_Held] = ModelBatchers(BatchPolicy(config.max_batch, config.max_wait_ms))
        self.workers: dict[str, WorkerCapacity] = {}
        self.streams = RequestStreams(self.redis, self.keys, SCHEDULER_GROUP, config.read_shards)
        self._cluster_poll = ClusterPoll()  # its streams' reads while idle, on a cluster
        self._stop = threading.Event()
        self._next_refresh = 0.0
        self._models_seen: dict[str, float] = {}  # model -> when a live worker last served it
        self._next_housekeeping = 0.0
        self._next_sweep = 0.0
        self._next_consumer_sweep = 0.0
        self._next_shards_complaint = 0.0
        self._wrong_shards_heard: set[str] = set()  # workers of another --shards, logged once each
        self._started_at = clock()
        self._next_unread_complaint = 0.0
        self._missing_since: dict[str, float] = {}
        # Redis's clock minus ours, from TIME; None until a tight sample came back.
        self._broker_offset_s: float | None = None
        self.jobs_dispatched = 0

    # -- lifecycle --------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        log.info("scheduler starting: %s", self.config.describe())
        metrics.precreate_scheduler_series()
        metrics.serve(self.config.metrics_port, metrics.SCHEDULER_REGISTRY, self.config.metrics_host)
        self._setup()
        run_until_stopped(self._stop, self.run_once, self._reconnect)
        log.info("scheduler %s stopped; %d requests left pending for other schedulers",
                 self.config.scheduler_id, len(self.batcher))

    def _setup(self) -> None:
        for stream in self.streams:
            ensure_group(self.redis, stream, SCHEDULER_GROUP)
        self.streams.discover(self.clock())
        before = publish_settings(self.redis, self.keys, max_queue=self.config.max_queue,
                                  max_attempts=self.config.max_attempts)
        if before is not None and before != self.keys.shards:
            log.warning("the fleet's schedulers ran --shards %d; this one runs %d and has made it the fleet's: "
                        "producers and workers of %d now refuse to start (WrongShards), and requests still "
                        "queued in the old streams wait there until a scheduler of %d takes them "
                        "(docs/deploy.md, \"Redis Cluster\")", before, self.keys.shards, before, before)
        load_library(self.redis, LIBRARY)  # producers may only FCALL it (docs/security.md)

    def _reconnect(self) -> None:
        """After a lost connection or an error reply: put back what the schedulers own (the
        request stream and its group, the config hash, the producers' functions; a fleet key of
        the wrong type is deleted first), then re-read what this scheduler was delivered."""
        try:
            owned = {self.keys.workers: "zset"}
            for shard in range(self.keys.shards):
                owned.update({self.keys.requests_of("", shard): "stream", self.keys.config_in(shard): "hash",
                              self.keys.stats_in(shard): "hash", self.keys.dead_letters_in(shard): "stream"})
            repair_keys(self.redis, owned)
            self.streams.forget()  # an error reply may mean a tenant's stream was deleted
            self._setup()
            self._read_own_pending()
        except redis.RedisError as exc:
            log.warning("could not set up again yet (%s); retrying", exc)

    def _read_own_pending(self) -> None:
        """Requests delivered to this scheduler whose reply the lost connection swallowed.

        They sit in the group's pending list under our name, where `>` never
        returns them; without this they would wait claim_idle_ms for XAUTOCLAIM.
        """
        held = {(h.stream, h.entry_id) for h in self.batcher.items()}
        reply = read_streams(self.redis, SCHEDULER_GROUP, self.config.scheduler_id, self.streams.read_positions("0"),
                             count=self.config.read_ahead)
        for stream, entries in reply or ():
            stream = _text(stream)
            self._accept(stream, [(entry_id, fields) for entry_id, fields in entries
                                  if (stream, _text(entry_id)) not in held])

    # -- one iteration -------------------------------------------------------
    def run_once(self) -> None:
        now = self.clock()
        if now >= self._next_refresh:
            self._refresh_workers()
            self._next_refresh = now + (0.02 if len(self.batcher) else 0.1)
        if now >= self._next_housekeeping:
            self._housekeeping(now)
            self._next_housekeeping = now + 1.0
        self._read(self._block_ms(now))
        self._dispatch_due()

    def _block_ms(self, now: float) -> int | None:
        """How long XREADGROUP may block: until the next batch or refresh is due."""
        wait_ms = int(self._seconds_to_wait(now) * 1000)
        return wait_ms if wait_ms > 0 else None

    def _seconds_to_wait(self, now: float) -> float:
        waits = [self._next_refresh - now, self._next_housekeeping - now]
        due = self.batcher.seconds_until_due(now, [m for m in self.batcher.models() if self._can_act(m)])
        if due is not None:
            waits.append(due)
        return max(0.0, min(waits))

    def _can_act(self, requested: str) -> bool:
        """Whether a due batch for this model could go now: a worker serving it has room, or
        it must be refused (live workers serve other models only)."""
        try:
            model = policy.route(requested, policy.models_served(self.workers))
        except UnknownModel:
            return True
        return model is not None and pick_worker(self.workers, model) is not None

    def _read(self, block_ms: int | None) -> None:
        room = self.config.read_ahead - len(self.batcher)
        if room <= 0:
            if block_ms:
                self._stop.wait(block_ms / 1000)
            return
        # Redis times out a BLOCK only on its cron tick (every 100 ms at the default hz 10),
        # so while a batch is open a short BLOCK would stretch max_wait_ms to a tick.
        # Instead: read without blocking; while requests keep coming, read again at once
        # (the batch may fill to max_batch early); once a read comes back empty, sleep
        # out the window in one wait (each wake-up of a busy machine costs latency).
        poll = len(self.batcher) > 0 and (block_ms is None or block_ms < SERVER_TICK_MS)
        # Every stream is asked for the same share, so a tenant's flood cannot fill the room.
        reply = read_streams(
            self.redis, SCHEDULER_GROUP, self.config.scheduler_id, self.streams.read_positions(">"),
            count=self.streams.share(min(room, 1024)), block_ms=None if poll else block_ms,
            poll=self._cluster_poll)
        for stream, entries in reply or ():
            self._accept(_text(stream), entries)
        if poll and not reply:
            self._sleep(self._seconds_to_wait(self.clock()))

    def _sleep(self, seconds: float) -> None:
        """Sleep out a batch window on time: the OS timer wakes a sleeper ~0.1-0.2 ms late
        (measured on a 2-core VM), so wake that much early and spin the rest."""
        if seconds <= 0:
            return
        until = time.monotonic() + seconds
        if seconds > TIMER_SLACK_S and self._stop.wait(seconds - TIMER_SLACK_S):
            return
        while time.monotonic() < until:
            pass

    def _accept(self, stream: str, entries) -> None:
        """Batch the requests of newly read entries of one stream that hold their id's claim;
        reject the unreadable ones and drop second submissions of an id (scripts.CLAIM)."""
        now = self.clock()
        readable, unreadable = [], []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending (claimed late): nothing to do
                continue
            decoded = self._decode_entry(stream, entry_id, fields)
            (readable if isinstance(decoded, _Held) else unreadable).append(decoded)
        for held in self._claimed(readable):
            metrics.requests_received.labels(str(held.request.priority), self._model_label(held.request.model)).inc()
            self.batcher.add(held, self._arrival(held.entry_id, now), model=held.request.model,
                             priority=held.request.priority, producer=held.request.producer,
                             tenant=self.streams.tenant(held.stream))
        # After the claims: an unreadable entry naming the id of a valid one read with it
        # must not answer that request.
        for rejection in unreadable:
            self._reject(*rejection)

    def _claimed(self, readable: list[_Held]) -> list[_Held]:
        """The entries that hold their request's claim, each with the attempt batchd counted
        (never the one the entry names); the rest are dropped."""
        if not readable:
            return []
        script, keys, args = scripts.claim_call(self.keys, self.config.result_ttl_s,
                                                [(h.request.id, h.entry_id) for h in readable])
        attempts = script.run(self.redis, keys, args)
        claimed, second = [], []
        for held, attempt in zip(readable, attempts):
            if attempt < 0:
                second.append(held)
                continue
            if held.request.attempt != attempt:
                held.request = msgspec.structs.replace(held.request, attempt=attempt)
            claimed.append(held)
        if second:
            log.info("dropped %d second submissions of ids already claimed or finished (%s)", len(second),
                     ", ".join(h.request.id for h in second[:5]))
            metrics.requests_rejected.labels("duplicate").inc(len(second))
            self._ack(*second)
        return claimed

    def _model_label(self, model: str) -> str:
        """A request's model as a metric label: a producer's name for a model nobody serves
        becomes "(unknown)", so made-up names cannot grow the series without bound."""
        if not model or any(model in worker.models for worker in self.workers.values()):
            return model
        return "(unknown)"

    def _arrival(self, entry_id: str, now: float) -> float:
        """When the request reached Redis, on this scheduler's clock (see MAX_TRANSIT_CREDIT_S)."""
        if self._broker_offset_s is None:
            return now
        entered = parse_stream_id(entry_id)[0] / 1000.0 - self._broker_offset_s
        return max(now - MAX_TRANSIT_CREDIT_S, min(now, entered))

    def _decode_entry(self, stream: str, entry_id, fields) -> _Held | tuple:
        """The entry's request, or the arguments of its rejection (_reject)."""
        entry_id = _text(entry_id)
        raw_id = fields.get(b"id")
        request_id = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else None
        data = fields.get(b"data")
        tenant = self.streams.tenant(stream)
        if request_id is not None and is_request_id(request_id) and \
                self.keys.shard_of(request_id) != self.keys.shard_of_key(stream):
            return stream, entry_id, request_id, data, self._wrong_shard(stream, request_id), False
        if request_id is not None and tenant_of(request_id) != tenant:
            # Another tenant's id (or a tenant's id on the shared stream): never this entry's to
            # run or answer, so no producer can take an id outside its own namespace.
            return stream, entry_id, request_id, data, InvalidRequest(
                f"request id {request_id!r} is not in this stream's namespace: ids on "
                f"{stream} " + (f"start with {tenant + '/'!r}" if tenant else "contain no '/'"), None), False
        try:
            if data is None:
                raise InvalidRequest("stream entry has no 'data' field (see docs/protocol.md)", request_id)
            request = decode_request(data, request_id)
        except InvalidRequest as exc:
            return stream, entry_id, request_id, data, exc
        except Exception as exc:  # a decoder bug must cost this entry, never the scheduler
            log.exception("could not decode entry %s", entry_id)
            return stream, entry_id, request_id, data, InvalidRequest(
                f"request could not be decoded: {type(exc).__name__}: {exc}", request_id)
        if tenant_of(request.id) != tenant:  # an entry without an id field
            return stream, entry_id, request.id, data, InvalidRequest(
                f"request id {request.id!r} is not in the namespace of {stream}", None), False
        if self.keys.shard_of(request.id) != self.keys.shard_of_key(stream):
            return stream, entry_id, request.id, data, self._wrong_shard(stream, request.id), False
        return _Held(entry_id, request, data, stream)

    def _wrong_shard(self, stream: str, request_id: str) -> InvalidRequest:
        """An id submitted to another shard's stream than its own (a producer started with another
        --shards than the fleet's, or a raw XADD): its keys live in that other shard, which a
        script on this stream may not touch (one slot per script on Redis Cluster), so it is
        dead-lettered unanswered."""
        return InvalidRequest(
            f"request id {request_id!r} belongs to shard {self.keys.shard_of(request_id)} of "
            f"{self.keys.shards}, not to {stream}: start producers with the fleet's --shards "
            f"({self.keys.shards}; docs/deploy.md)", None)

    # -- dispatch ---------------------------------------------------------
    def _dispatch_due(self) -> None:
        for requested in self.batcher.due(self.clock()):
            self._dispatch_model(requested)

    def _dispatch_model(self, requested: str) -> None:
        """Dispatch the due batches of the requests naming one model ("": none) to workers serving it."""
        while True:
            now = self.clock()
            if not self.batcher.is_due(requested, now):
                return
            try:
                model = policy.route(requested, policy.models_served(self.workers), self._recent_models(now))
            except UnknownModel as exc:
                self._refuse_model(requested, exc)
                return
            worker = pick_worker(self.workers, model) if model is not None else None
            if worker is None:
                self._sweep_held(now)
                return
            opened = self.batcher.opened_at(requested)
            batch = self.batcher.take(requested, now, worker.available())
            if not batch:
                return
            # One job per shard: DISPATCH touches the job's requests' keys, which live in their shard.
            for batch in self._by_shard(self._drop_expired(batch, now)):
                while batch:
                    cancelled, stale = self._send_job(worker, batch)
                    if not cancelled and not stale:
                        break
                    for held in cancelled:
                        self._answer(held, cancelled_before_start(held.request.id))
                    if stale:
                        log.info("dropped %d requests whose id another entry or worker holds now", len(stale))
                        self._ack(*stale)
                    batch = [held for held in batch if held not in cancelled and held not in stale]
            metrics.batch_wait.observe(max(0.0, now - (opened or now)))

    def _send_job(self, worker: WorkerCapacity, batch: list[_Held]) -> tuple[list[_Held], list[_Held]]:
        """Dispatch the batch in one atomic script (scripts.DISPATCH), which also bumps the
        fleet-wide counters of `batchd status`. If any request was cancelled meanwhile, or is
        no longer this entry's to run, nothing is sent, and those requests are returned."""
        job = Job(v=PROTOCOL_VERSION, job_id=uuid.uuid4().hex, scheduler=self.config.scheduler_id,
                  created_at=self.clock(), requests=[held.request for held in batch])
        script, keys, args = scripts.dispatch_call(
            self.keys, worker.worker_id, encode(job), SCHEDULER_GROUP, self.config.result_ttl_s,
            [(held.request, held.stream, held.entry_id) for held in batch])
        reply = script.run(self.redis, keys, args)
        if not reply[0]:
            cancelled, stale = reply[1], reply[2]
            return [batch[p - 1] for p in cancelled], [batch[p - 1] for p in stale]
        detail = reply[1]
        worker.dispatched(self.keys.shard_of(batch[0].request.id), parse_stream_id(detail), len(batch))
        self.jobs_dispatched += 1
        metrics.jobs_dispatched.inc()
        metrics.job_size.observe(len(batch))
        return [], []

    def _by_shard(self, batch: list[_Held]) -> list[list[_Held]]:
        if self.keys.shards == 1:
            return [batch]
        parts: dict[int, list[_Held]] = {}
        for held in batch:
            parts.setdefault(self.keys.shard_of(held.request.id), []).append(held)
        return list(parts.values())

    def _refuse_model(self, requested: str, error: UnknownModel) -> None:
        """Answer every held request naming a model no live worker serves."""
        refused = self.batcher.remove(lambda held: held.request.model == requested)
        log.info("refused %d requests for model %r: %s", len(refused), requested, error.message)
        for held in refused:
            self._answer(held, error)

    def _drop_expired(self, batch: list[_Held], now: float) -> list[_Held]:
        kept = []
        for held in batch:
            if held.request.deadline is not None and held.request.deadline <= now:
                self._answer(held, expired_before_start(held.request.id, WAITING_FOR))
            else:
                kept.append(held)
        return kept

    def _sweep_held(self, now: float) -> None:
        """While no worker has room, still answer held requests that expired or were cancelled."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        held = list(self.batcher.items())
        if held:
            doomed = self._answer_doomed(held, now)
            if doomed:
                self.batcher.remove(lambda h: h.request.id in doomed)

    def _answer_doomed(self, held: list[_Held], now: float) -> set[str]:
        """Answer the expired and cancelled requests among `held`; return their ids.

        Used while no worker has room; a dispatch checks only the batch it
        sends, inside scripts.DISPATCH (checking every held request at every
        dispatch made the scheduler quadratic in its backlog).
        """
        flags = self._cancel_flags(held)
        doomed = set()
        for h, flag in zip(held, flags):
            if h.request.deadline is not None and h.request.deadline <= now:
                self._answer(h, expired_before_start(h.request.id, WAITING_FOR))
            elif cancel_matches(h.request, flag):
                self._answer(h, cancelled_before_start(h.request.id))
            else:
                continue
            doomed.add(h.request.id)
        return doomed

    def _cancel_flags(self, held: list[_Held]) -> list:
        """Each held request's cancel flag (on a cluster, one MGET per slot)."""
        return mget_any(self.redis, [self.keys.cancelled(h.request.id) for h in held])

    def _answer(self, held: _Held, error: BatchdError) -> None:
        """Finish a held request with an error, if it is still this entry's (scripts.ANSWER),
        and drop its stream entry."""
        result = error_result(held.request.id, error, finish_reason_of(error), held.request.submitted_at)
        script, keys, args = scripts.answer_call(self.keys, held.request.id, held.entry_id, held.request.attempt,
                                                 seal_final(result, held.request), self.config.result_ttl_s)
        script.run(self.redis, keys, args)
        self._ack(held)
        metrics.requests_rejected.labels(error.code).inc()

    def _reject(self, stream: str, entry_id: str, request_id: str | None, data: bytes | None,
                error: InvalidRequest, answer: bool = True) -> None:
        """Bad input: keep it (bounded) for operators, and tell its caller when the id it names
        is readable, in the stream's namespace (`answer`) and not another request's (scripts.REJECT)."""
        log.info("rejected request %s: %s", request_id or f"entry {entry_id}", error.message[:200])
        valid_id = request_id if answer and request_id and is_request_id(request_id) else None
        final = encode(FinalEvent(error_result(valid_id, error))) if valid_id else None
        script, keys, args = scripts.reject_call(self.keys, stream, SCHEDULER_GROUP, entry_id, valid_id, error.code,
                                                 error.message, data, final, self.config.result_ttl_s,
                                                 named_id=(request_id or "")[:256])
        script.run(self.redis, keys, args)
        metrics.requests_rejected.labels(error.code).inc()
        metrics.dead_letters.labels(error.code).inc()

    def _ack(self, *held: _Held) -> None:
        for stream, entry_ids in by_stream((h.stream, h.entry_id) for h in held).items():
            with self.redis.pipeline(transaction=True) as pipe:  # one stream: one slot on a cluster
                pipe.xack(stream, SCHEDULER_GROUP, *entry_ids)
                pipe.xdel(stream, *entry_ids)
                pipe.execute()

    # -- workers --------------------------------------------------------------
    def _refresh_workers(self) -> None:
        sent = self.clock()
        if is_cluster(self.redis):  # a cluster pipeline takes keyed commands only
            broker_s, broker_us = self.redis.time()
            received = self.clock()
            members = self.redis.zrange(self.keys.workers, 0, -1)
        else:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.zrange(self.keys.workers, 0, -1)
                (broker_s, broker_us), members = pipe.execute()
            received = self.clock()
        self._note_broker_time(broker_s + broker_us / 1e6, sent, received)
        worker_ids = [w.decode() for w in members]
        beats = self.redis.mget([self.keys.heartbeat(w) for w in worker_ids]) if worker_ids else []
        live: dict[str, WorkerCapacity] = {}
        slots = free = 0
        for worker_id, raw in zip(worker_ids, beats):
            if raw is None:
                continue
            try:
                beat = decode_heartbeat(raw)
            except (msgspec.MsgspecError, BatchdError):
                log.warning("ignoring unreadable heartbeat of worker %s", worker_id)
                continue
            if beat.shards is not None and beat.shards != self.keys.shards:
                if worker_id not in self._wrong_shards_heard:
                    self._wrong_shards_heard.add(worker_id)
                    log.error("worker %s runs --shards %d against this scheduler's %d: it reads job streams "
                              "this scheduler does not write, so it gets no requests; restart it with --shards %d",
                              worker_id, beat.shards, self.keys.shards, self.keys.shards)
                continue
            capacity = self.workers.get(worker_id) or WorkerCapacity(worker_id, 0)
            capacity.refresh(beat.requests_it_can_take(), parse_last_reads(beat.last_job_read))
            capacity.models = frozenset(models_served(beat))
            live[worker_id] = capacity
            slots += beat.total_slots
            # A heartbeat of an older worker counts its prefetch queue in free_slots.
            free += min(beat.free_slots, beat.total_slots)
        self.workers = live
        now = self.clock()
        for model in policy.models_served(live):
            self._models_seen[model] = now
        metrics.live_workers.set(len(live))
        metrics.total_slots.set(slots)
        metrics.free_slots.set(free)

    def _recent_models(self, now: float) -> set[str]:
        """Models a live worker served within MODEL_GRACE_S."""
        return {model for model, seen in self._models_seen.items() if now - seen <= MODEL_GRACE_S}

    def _note_broker_time(self, broker_now: float, sent: float, received: float) -> None:
        if received - sent <= CLOCK_SAMPLE_MAX_RTT_S or self._broker_offset_s is None:
            self._broker_offset_s = broker_now - (sent + received) / 2

    def _check_every_shard_is_read(self, now: float) -> None:
        # On the broker's clock, which every scheduler shares (a host's may be off by seconds).
        unread = mark_shards_read(self.redis, self.keys, self.streams.shards, now + (self._broker_offset_s or 0.0))
        metrics.unread_shards.set(len(unread))
        # A scheduler that has just started has not yet seen the others mark theirs.
        if unread and now - self._started_at > UNREAD_AFTER_S and now >= self._next_unread_complaint:
            self._next_unread_complaint = now + 60.0
            log.error("request shards %s are read by no scheduler: their requests wait until one is started "
                      "with --read-shards covering them (or without --read-shards)", ",".join(map(str, unread)))

    def _housekeeping(self, now: float) -> None:
        self.streams.discover(now)
        self._keep_claims()
        self._claim_abandoned()
        self._reap_dead_workers()
        self._bound_backlogs()
        self._repair_stream_ids()
        # Again every second: a config hash someone deleted is back at once, so max_queue holds.
        before = publish_settings(self.redis, self.keys, max_queue=self.config.max_queue,
                                  max_attempts=self.config.max_attempts)
        if before is not None and before != self.keys.shards and now >= self._next_shards_complaint:
            # Two schedulers of one fleet with different --shards overwrite each other each second.
            self._next_shards_complaint = now + 60.0
            log.error("another scheduler of this fleet runs --shards %d against this one's %d: each reads "
                      "only its own count's streams; run every scheduler with the same --shards", before,
                      self.keys.shards)
        self._take_overload_count()
        if self.keys.shards > 1:
            self._check_every_shard_is_read(now)
        if now >= self._next_consumer_sweep:
            self._next_consumer_sweep = now + CONSUMER_SWEEP_INTERVAL_S
            self._forget_dead_schedulers()

    def _repair_stream_ids(self) -> None:
        """Set each request stream's last id back from the far future (scripts.REPAIR_STREAM_ID),
        so SUBMIT works again within a second of a producer's XADD of the largest id."""
        streams = list(self.streams)
        outcomes, _ = run_in_pipeline(self.redis, [(scripts.REPAIR_STREAM_ID, [stream], [scripts.FUTURE_ID_MARGIN_MS])
                                                   for stream in streams])
        for stream, repaired in zip(streams, outcomes):
            if isinstance(repaired, redis.ResponseError):  # a server this script does not know: dispatch goes on
                log.error("could not check %s's last entry id: %s", stream, repaired)
            elif isinstance(repaired, Exception):
                raise repaired
            elif repaired == 1:
                log.error("%s had a last entry id far in the future (an explicit XADD id); set it back to now "
                          "so submits work again", stream)

    def _bound_backlogs(self) -> None:
        """Export the backlog summed over every request stream, and answer what a tenant queued
        beyond max_queue (raw XADDs skip SUBMIT's bound) with Overloaded (scripts.OVERFLOW)."""
        streams = list(self.streams)
        with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            lengths = pipe.execute()
        metrics.requests_queued.set(sum(lengths))
        for stream, length in zip(streams, lengths):
            metrics.requests_queued_by_tenant.labels(self.streams.tenant(stream)).set(length)
        if self.config.max_queue <= 0:
            return
        over = [(stream, length - self.config.max_queue) for stream, length in zip(streams, lengths)
                if length > self.config.max_queue]
        for stream, excess in over:
            self._answer_overflow(stream, min(excess, max(1, OVERFLOW_BUDGET // len(over))))

    def _answer_overflow(self, stream: str, excess: int) -> None:
        """Answer the newest `excess` entries of a stream with Overloaded, as SUBMIT would have."""
        tenant = self.streams.tenant(stream)
        calls = []
        for entry_id, fields in self.redis.xrevrange(stream, "+", "-", count=excess):
            decoded = self._decode_entry(stream, entry_id, fields)
            if isinstance(decoded, _Held):
                error = Overloaded(overloaded_message(stream), decoded.request.id)
                result = error_result(decoded.request.id, error, finish_reason_of(error), decoded.request.submitted_at)
                final = seal_final(result, decoded.request)
                calls.append(scripts.overflow_call(self.keys, stream, SCHEDULER_GROUP, decoded.entry_id,
                                                   decoded.request.id, final, self.config.result_ttl_s))
            else:
                calls.append(scripts.overflow_call(self.keys, stream, SCHEDULER_GROUP, decoded[1], None, None,
                                                   self.config.result_ttl_s))
        outcomes, _ = run_in_pipeline(self.redis, calls)
        refused = sum(1 for outcome in outcomes if outcome in (0, 1))
        if refused:
            metrics.requests_overloaded.labels(tenant).inc(refused)
            log.warning("answered %d requests queued beyond max_queue=%d on %s with Overloaded (raw XADDs "
                        "past the bound)", refused, self.config.max_queue, stream)

    def _take_overload_count(self) -> None:
        """Submits refused as Overloaded happen in the producers' SUBMIT function, which counts
        them in Redis, one counter per tenant; each scheduler takes (GETDEL) what accumulated
        into its own series of that tenant, so the fleet's sum counts each refusal once. Only a
        tenant may write its counter: a forged INCR moves its own series and no other."""
        streams = list(self.streams)
        tenants = [self.streams.tenant(stream) for stream in streams]
        with self.redis.pipeline(transaction=False) as pipe:
            for stream, tenant in zip(streams, tenants):
                pipe.getdel(self.keys.overloaded_of(tenant, self.keys.shard_of_key(stream) or 0))
            taken = pipe.execute(raise_on_error=False)
        for tenant, value in zip(tenants, taken):
            try:
                count = int(value or 0)
            except (TypeError, ValueError):  # a counter overwritten with something else, or an error
                count = 0
            if count > 0:
                metrics.requests_overloaded.labels(tenant).inc(count)

    def _forget_dead_schedulers(self) -> None:
        """Remove group consumers that hold nothing and have not read for a long time: schedulers
        that died or restarted under a new id (a live one reads every few hundred ms and would
        simply be recreated by its next read)."""
        idle_ms = max(DEAD_CONSUMER_IDLE_S * 1000, 6 * self.config.claim_idle_ms)
        for stream in self.streams:
            for consumer in self.redis.xinfo_consumers(stream, SCHEDULER_GROUP):
                name = _text(consumer["name"])
                if name != self.config.scheduler_id and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                    self.redis.xgroup_delconsumer(stream, SCHEDULER_GROUP, name)
                    log.info("removed consumer %s from the scheduler group of %s: idle %.0fs with nothing pending",
                             name, stream, consumer["idle"] / 1000)

    def _keep_claims(self) -> None:
        """Touch the entries this scheduler holds so no other scheduler takes them."""
        for stream, held in by_stream((h.stream, h.entry_id) for h in self.batcher.items()).items():
            for start in range(0, len(held), 1000):
                self.redis.xclaim(stream, SCHEDULER_GROUP, self.config.scheduler_id, 0,
                                  held[start:start + 1000], justid=True)

    def _claim_abandoned(self) -> None:
        """Take over requests a dead scheduler read but never dispatched."""
        for stream in self.streams:
            room = self.config.read_ahead - len(self.batcher)
            if room <= 0:
                return
            reply = self.redis.xautoclaim(stream, SCHEDULER_GROUP, self.config.scheduler_id,
                                          self.config.claim_idle_ms, "0-0", count=min(room, 1000))
            entries = reply[1] if reply else []
            if entries:
                log.info("claimed %d requests of %s abandoned by another scheduler", len(entries), stream)
                metrics.requests_reclaimed.inc(len(entries))
                self._accept(stream, entries)

    def _reap_dead_workers(self) -> None:
        worker_ids = [w.decode() for w in self.redis.zrange(self.keys.workers, 0, -1)]
        now = time.monotonic()
        missing = {}
        for worker_id in worker_ids:
            if worker_id in self.workers or self.redis.exists(self.keys.heartbeat(worker_id)):
                continue
            # Wait one more housekeeping round: a scheduler whose view is a moment
            # old may still dispatch to this worker, and reaping deletes its stream.
            missing[worker_id] = self._missing_since.get(worker_id, now)
            if now - missing[worker_id] < REAP_GRACE_S:
                continue
            if self.redis.set(self.keys.reaping(worker_id), self.config.scheduler_id, nx=True, ex=60):
                self.reap_worker(worker_id)
        self._missing_since = missing

    def reap_worker(self, worker_id: str) -> int:
        """Re-dispatch every unfinished request of a worker that stopped beating."""
        streams = self.keys.job_streams(worker_id)
        requeued = 0
        for stream in streams:
            for entry_id, fields in self.redis.xrange(stream, "-", "+"):
                job = read_job(entry_id, fields, f"dead worker {worker_id}")
                if job is not None:
                    requeued += self._requeue(job.requests, worker_id)
        # Not one transaction: the streams lie in every shard. Each step is safe to repeat, and
        # the reaping lock (60 s) lets another scheduler finish what a killed one began.
        with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.delete(stream)
            pipe.zrem(self.keys.workers, worker_id)
            # A worker that wakes, re-registers and dies again can be reaped again at once.
            pipe.delete(self.keys.reaping(worker_id))
            pipe.execute()
        log.warning("worker %s stopped heartbeating; re-dispatched %d unfinished requests", worker_id, requeued)
        return requeued

    def _requeue(self, requests: list[Request], worker_id: str) -> int:
        requeued, dead = recovery.hand_back(
            self.redis, self.keys, requests, f"worker {worker_id} stopped heartbeating",
            max_attempts=self.config.max_attempts, result_ttl_s=self.config.result_ttl_s, worker_id=worker_id)
        metrics.requests_reclaimed.inc(requeued)
        if dead:
            metrics.dead_letters.labels(WorkerFailed.code).inc(dead)
        return requeued


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
