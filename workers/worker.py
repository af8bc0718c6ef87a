"""The worker daemon's loop: read jobs, admit their requests into the engine, step it, drain.

Each iteration takes the jobs the last round trip read (or waits for some),
applies cancellations, steps the engine and hands the step's tokens and final
results to the outbox (outbox.py), which sends them in one round trip while the
next step runs. What the worker holds and can take is bookkeeping without I/O
(holdings.py). A finished request's result is stored and published atomically
with a lease check, and only then is its job acknowledged: a worker killed at
any point leaves its job on the stream for a scheduler to re-dispatch, and a
worker that wakes from a pause past its lease cannot deliver a second result.

Each thread has its own connection: this loop's (job reads, cancel flags, acks,
hand-backs), the outbox's (every publish, result and heartbeat), the lease
keeper's (lease.py), and the cancel subscription's (cancels.py).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from batchd.client import connection, tokenizers
from batchd.client.connection import CONNECTION_LOST, describe
from batchd.client.errors import BatchdError, InvalidRequest, UnknownModel
from batchd.client.keys import WORKER_GROUP, Keys, uses_shard_channels, job_ref, parse_job_ref
from batchd.client.protocol import PROTOCOL_VERSION, Heartbeat, Request, RestartEvent, Result, error_result
from batchd.daemon import metrics, recovery, toolkit
from batchd.daemon.scripts import owner_token
from batchd.daemon.toolkit import DaemonConfig

from .cancels import CancelFeed
from .engine import Engine, EngineRequest, ScoreItem, StepOutput
from .holdings import Advertisement, Held, Holdings, can_take, free_slots
from .lease import LeaseKeeper
from .outbox import Outbox, Parcel, Receipt
from .pins import Pins

log = logging.getLogger("batchd.worker")

# How often an idle worker that owes schedulers a heartbeat looks for jobs meanwhile.
POLL_INTERVAL_MS = 1
# Job stream entries read at once.
JOBS_PER_READ = 64
# What a request expired waiting for, as its caller reads it.
WAITING_FOR = "a slot was free"


@dataclass
class WorkerConfig(DaemonConfig):
    worker_id: str = field(default_factory=toolkit.instance_id)
    heartbeat_interval_s: float = 1.0
    # A worker silent for this long is declared dead and its requests re-dispatched.
    lease_ms: int = 5000
    # On SIGTERM, finish in-flight requests for this long, then hand the rest back.
    drain_timeout_s: float = 30.0
    # The lease keeper lets the lease lapse once the loop has been stuck this long (lease.py).
    stall_timeout_s: float = 120.0
    # Requests a worker accepts beyond its slots, waiting in its own queue: a
    # slot freed by one step is refilled at the next step from this queue
    # instead of after a heartbeat -> scheduler -> job round trip. None: half
    # the slots.
    prefetch: int | None = None
    # Cancel a request whose token events nobody has received for this long:
    # its caller is gone (the protocol requires subscribing before submitting).
    # Longer than a client's reconnect after a Redis restart; 0 disables.
    abandoned_after_s: float = 10.0
    # The names requests may give as `model` to reach this worker (--served-model-name);
    # empty: the engine's model name.
    served_models: list[str] = field(default_factory=list)
    # How long scoring results stay stored (result_ttl_s is generate results'): their caller
    # reads them within milliseconds of the final event (or at its next 2 s poll if its
    # subscription dropped), and a full next-token vector is 192 KiB for SmolLM2: Redis holds
    # calls/s x this x that (docs/integrations.md: 30 s held 148 MiB in LLaMPPL's example).
    scoring_result_ttl_s: int = 5
    # Book stored results (and so acknowledge their jobs as done) only once this many
    # replicas hold them (WAIT); 0: as soon as the master does (docs/reliability.md).
    durable_replicas: int = 0


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, connect: Callable[[], redis.Redis] | None = None,
                 clock=time.time, state: metrics.WorkerState | None = None):
        """connect() opens a connection to Redis (default: to config.redis_url); each thread of
        the worker calls it once for its own. state: what /metrics and /health report,
        created before the engine loaded its model when the process serves them from its start."""
        self.config = config
        self.engine = engine
        self.clock = clock
        connect = connect or (lambda: connection.connect(config.redis_url))
        self.redis = connect()
        self.keys = Keys(config.prefix, config.shards,
                         shard_channels=uses_shard_channels(connection.is_cluster(self.redis), config.shards))
        # One job stream per shard: a job carries one shard's requests (docs/deploy.md).
        self.streams = self.keys.job_streams(config.worker_id)
        self._cluster_poll = toolkit.ClusterPoll()  # its job streams' reads while idle, on a cluster
        self.holdings = Holdings()
        self.advertised = Advertisement(config.heartbeat_interval_s)
        self.served_models = list(config.served_models) or [engine.model_name]
        self.tokenizer = _ServedTokenizer(engine.served_tokenizer(),
                                          [self.keys.tokenizer(model) for model in self.served_models])
        self.outbox = Outbox(connect(), self.keys, config.worker_id, config.result_ttl_s, config.lease_ms,
                             kept_alive=self.tokenizer.keys, scoring_result_ttl_s=config.scoring_result_ttl_s,
                             durable_replicas=config.durable_replicas)
        self._lease = LeaseKeeper(connect(), self.keys.heartbeat(config.worker_id), config.lease_ms,
                                  config.heartbeat_interval_s, config.stall_timeout_s)
        self._cancels = CancelFeed(self.redis, self.keys.cancel_channel, self.streams)
        self._series = metrics.WorkerSeries(config.worker_id, self.served_models[0])
        self._pins = Pins(self.keys, engine, self.served_models, config.heartbeat_interval_s)
        self.state = state or metrics.WorkerState(config.worker_id)
        self._stop = threading.Event()
        self._draining = False
        # XREADGROUP replies (or errors) that came back with step parcels, not yet taken.
        # A list: two parcels can be booked before the next take (one by a step, one
        # when the engine then runs dry), and a reply dropped is a job never run.
        self._jobs_in_hand: list = []
        # Scoring requests read this iteration: answered together in one forward pass
        # (engines that do not score inside their steps).
        self._scoring: list[tuple[Held, ScoreItem]] = []
        self.started_at = clock()

    @property
    def tracked(self) -> dict[str, Held]:
        """The requests this worker holds, by id."""
        return self.holdings.requests

    def can_take(self) -> int:
        """Requests this worker accepts now, its prefetch queue included."""
        engine = self.engine
        return can_take(engine.total_slots, self.config.prefetch, engine.num_running, engine.num_waiting)

    # -- lifecycle --------------------------------------------------------
    def stop(self) -> None:
        """Begin a graceful drain (SIGTERM)."""
        self._stop.set()

    def run(self) -> None:
        cfg = self.config
        log.info("worker starting: id=%s engine=%s model=%s serves=%s slots=%d redis=%s lease_ms=%d "
                 "drain_timeout_s=%s result_ttl_s=%d scoring_result_ttl_s=%d durable_replicas=%d tokenizer=%s "
                 "metrics_port=%s",
                 cfg.worker_id, self.engine.name, self.engine.model_name, ",".join(self.served_models),
                 self.engine.total_slots, describe(cfg.redis_url), cfg.lease_ms, cfg.drain_timeout_s,
                 cfg.result_ttl_s, cfg.scoring_result_ttl_s, cfg.durable_replicas,
                 self.tokenizer.info.hash[:12] if self.tokenizer.info else "-", cfg.metrics_port)
        metrics.serve(cfg.metrics_port, metrics.WORKER_REGISTRY, cfg.metrics_host, self.state.current)
        self._connect()
        self._lease.start()
        # The engine and its model live as long as the process: take them out of the cyclic
        # collector's full passes, which otherwise walk them again and again while the loop
        # allocates requests, events and tensors (vLLM freezes its start-up heap the same way;
        # benchmarks/serving_gpu.py, phase smc_gc, measures it).
        gc.collect()
        gc.freeze()
        self.state.set("serving")
        toolkit.run_until_stopped(self._stop, self.run_once, self._reconnect)
        self._drain()

    def _connect(self) -> None:
        try:
            self._book_in_flight()
        except CONNECTION_LOST:
            pass  # its results wait in the outbox
        for stream in self.streams:
            toolkit.ensure_group(self.redis, stream, WORKER_GROUP)
        self.tokenizer.store(self.redis)
        self._cancels.connect()
        self._jobs_in_hand = []  # whatever it held is on the pending list, read next
        self._read_pending_jobs()
        self._heartbeat(force=True)

    def _reconnect(self) -> None:
        try:
            toolkit.repair_keys(self.redis, {stream: "stream" for stream in self.streams})
            self._connect()
        except redis.RedisError as exc:
            log.warning("could not set up again yet (%s); retrying", exc)

    def _read_pending_jobs(self) -> None:
        """Jobs Redis delivered to this worker id but that it never finished reading or acking.

        A reply lost to a dropped connection, or a restart under the same
        --worker-id, leaves them in the group's pending list, where `>` never
        returns them again.
        """
        reply = toolkit.read_streams(self.redis, WORKER_GROUP, self.config.worker_id, self._positions("0"),
                                     count=10_000)
        for stream, entries in reply or ():
            for entry_id, fields in entries:
                entry_id = self._job_ref(stream, entry_id)
                if not self.holdings.is_open(entry_id):
                    self._admit_job(entry_id, fields)
                elif self.holdings.job_is_done(entry_id):
                    self._ack_jobs([entry_id])  # finished, but the ack was lost

    # -- one iteration -------------------------------------------------------
    def run_once(self) -> None:
        self._lease.progress()
        if not self.engine.has_work():
            self._book_in_flight()  # before waiting for jobs: book the last step, free its slots
        undelivered = self.outbox.take_undelivered()
        if undelivered:
            self._store_results(undelivered)
        if not self._draining:
            self._take_new_jobs(busy=self.engine.has_work())
        self._apply_cancels()
        if self._scoring:
            self._score()
        if self.engine.has_work():
            self._step()
        self._heartbeat()
        self._pins.check(self.redis)

    def _take_new_jobs(self, busy: bool) -> None:
        """Admit the jobs the last round trips read, and wait for more only when there is nothing else to do."""
        in_hand, self._jobs_in_hand = self._jobs_in_hand, []
        found = False
        for reply in in_hand:
            if not self._take_jobs(reply):
                break  # re-registered: what the others hold is on the pending list, read already
            found = found or bool(reply)
        if not in_hand or not (found or self.engine.has_work()):
            self._read_jobs(block_ms=None if busy else self._idle_wait_ms())

    def _idle_wait_ms(self) -> int:
        """Wait for jobs, but wake in time to advertise slots that just freed up."""
        return self.advertised.idle_wait_ms(self.clock(), self.can_take(), self.holdings.last_job_read)

    def _read_jobs(self, block_ms: int | None) -> None:
        try:
            # Redis times out a BLOCK only on its cron tick: a shorter wait is a poll,
            # so a due heartbeat is not held up by a tick.
            poll = block_ms is not None and block_ms < toolkit.SERVER_TICK_MS
            reply = toolkit.read_streams(self.redis, WORKER_GROUP, self.config.worker_id, self._positions(">"),
                                         count=JOBS_PER_READ, block_ms=None if poll else block_ms,
                                         poll=self._cluster_poll)
            if poll and not reply:
                self._stop.wait(min(block_ms, POLL_INTERVAL_MS) / 1000)
        except redis.ResponseError as exc:
            reply = exc
        self._take_jobs(reply)

    def _take_jobs(self, reply) -> bool:
        """Admit the jobs of an XREADGROUP reply, or react to its error; False if this
        worker had to re-register (its stream was reaped)."""
        if isinstance(reply, redis.ResponseError):
            if "NOGROUP" not in str(reply):
                raise reply
            # Our stream was reaped while we were paused: we are a new worker now.
            log.warning("job streams %s were reclaimed (this worker was presumed dead); re-registering",
                        ", ".join(self.streams))
            self._forget_reclaimed()
            self._connect()
            return False
        for stream, entries in reply or ():
            for entry_id, fields in entries:
                self._admit_job(self._job_ref(stream, entry_id), fields)
        return True

    def _positions(self, position: str) -> dict[str, str]:
        """XREADGROUP's streams argument: every job stream of this worker at one position."""
        return {stream: position for stream in self.streams}

    def _job_ref(self, stream, entry_id) -> str:
        """How this worker names a job it read (keys.job_ref): its shard and entry id."""
        stream = stream.decode() if isinstance(stream, bytes) else stream
        return job_ref(self.keys.shard_of_key(stream) or 0, entry_id.decode() if isinstance(entry_id, bytes) else entry_id)

    def _forget_reclaimed(self) -> None:
        """Drop the requests a scheduler took back: their slots are freed, their output never sent."""
        self._book_in_flight()  # its results are fenced now; book them before forgetting
        for request_id in self.holdings.requests:
            self.engine.cancel(request_id, "cancelled")
        self.holdings.forget_all()
        self.outbox.forget_undelivered()

    # -- admission -------------------------------------------------------------
    def _admit_job(self, entry_id: str, fields: dict) -> None:
        if self.holdings.is_open(entry_id):
            return  # read twice (a pipelined read and the re-read after a reconnect): it is running
        self.holdings.note_read(entry_id)
        job = toolkit.read_job(entry_id, fields, f"worker {self.config.worker_id}")
        if job is None:
            self._ack_jobs([entry_id])
            return
        # Read the cancel flags before the job is marked open: if Redis drops
        # here, the entry stays unknown to this worker and is read again from
        # the group's pending list on reconnect, instead of looking finished.
        fresh = [r for r in job.requests if r.id not in self.holdings.requests]  # a redelivered one runs here
        if fresh and self._cancels.needs_flags(entry_id):
            cancelled = self._cancel_flags(fresh)
        else:
            cancelled = [self._cancels.heard(r) for r in fresh]
        self.holdings.open_job(entry_id, [r.id for r in fresh])
        now = self.clock()
        restarts, answered = [], []
        for request, cancel_flag in zip(fresh, cancelled):
            held, answer = self._admit(entry_id, request, now, cancelled=cancel_flag)
            if answer is not None:
                answered.append((held, answer))
            elif request.attempt > 0:
                restarts.append((held, RestartEvent(attempt=request.attempt,
                                                    reason="resumed on worker " + self.config.worker_id)))
        self._publish(restarts, answered)
        if self.holdings.job_is_done(entry_id):  # every request a duplicate of one running here
            self._ack_jobs([entry_id])

    def _admit(self, entry_id: str, request: Request, now: float, cancelled: bool) -> tuple[Held, Result | None]:
        """Hand one request to the engine; returns its result when it has one already: a refusal,
        or the answer of a pin or unpin (their only I/O: the pin registry, workers/pins.py)."""
        held = Held(request, entry_id, owner_token(self.config.worker_id, request.attempt), now)
        try:
            if cancelled:
                raise toolkit.cancelled_before_start(request.id)
            if request.deadline is not None and request.deadline <= now:
                raise toolkit.expired_before_start(request.id, WAITING_FOR)
            if request.model and request.model not in self.served_models:
                # A scheduler routed by an old view of this worker (it restarted serving another).
                raise UnknownModel(f"worker {self.config.worker_id} serves {', '.join(self.served_models)}, "
                                   f"not {request.model!r}", request.id)
            if request.task in ("pin", "unpin"):
                return held, self._pins.answer(self.redis, request, self.config.worker_id)
            resolved = self._pins.resolve(self.redis, request)
            if request.task == "generate":
                prompt = self.engine.tokenize(resolved)
                self.engine.add(EngineRequest(request.id, prompt, request.params, request.deadline, now))
            else:
                self._admit_scoring(held, resolved, now)
        except BatchdError as exc:
            return held, error_result(request.id, exc, toolkit.finish_reason_of(exc), request.submitted_at,
                                      self.config.worker_id)
        except Exception as exc:  # a bug or a tokenizer crash must cost one request, not the worker
            log.exception("could not admit request %s", request.id)
            return held, error_result(
                request.id, BatchdError(f"worker could not admit the request: {type(exc).__name__}: {exc}"),
                "error", request.submitted_at, self.config.worker_id)
        self.holdings.hold(held)
        self._series.queue_time.observe(max(0.0, now - request.submitted_at))
        return held, None

    def _admit_scoring(self, held: Held, request: Request, now: float) -> None:
        """request: held.request with its pinned prefix spelled out."""
        scorer = self.engine.scorer()
        if scorer is None:
            raise InvalidRequest(f"the {self.engine.name} engine has no model: it cannot answer "
                                 f"{request.task} requests", request.id)
        item = scorer.prepare(request)
        if self.engine.scores_in_steps:
            # Prefill-only rows in the engine's own steps, beside generate requests,
            # reusing a cached prefix where a slot still holds one.
            held.score_item = item
            self.engine.add_score(EngineRequest(request.id, item.prompt_token_ids, request.params,
                                                request.deadline, now), item)
        else:
            self._scoring.append((held, item))

    # -- scoring outside the steps ------------------------------------------------
    def _score(self) -> None:
        """All scoring requests read this iteration, as one batched forward pass between engine steps."""
        batch, self._scoring = self._scoring, []
        worker_id = self.config.worker_id
        try:
            outputs = self.engine.scorer().score([item for _held, item in batch])
        except Exception as exc:  # a failed pass (out of memory) costs its requests, not the worker
            log.exception("scoring %d requests failed", len(batch))
            error = BatchdError(f"worker could not score the request: {type(exc).__name__}: {exc}")
            self._store_results([(held, error_result(held.request.id, error, "error", held.request.submitted_at,
                                                     worker_id)) for held, _item in batch])
            return
        now = self.clock()
        self._store_results([(held, held.score_result(item, output, now, worker_id))
                             for (held, item), output in zip(batch, outputs)])

    # -- cancellation -----------------------------------------------------------
    def _apply_cancels(self) -> None:
        heard, resynced = self._cancels.poll()
        held = self.holdings.requests
        cancelled = [request_id for request_id, secret in heard
                     if request_id in held and toolkit.cancel_matches(held[request_id].request, secret)]
        if resynced and held:
            # Back after a gap in the subscription: a cancel may have been missed meanwhile.
            requests = [h.request for h in held.values()]
            cancelled += [r.id for r, flag in zip(requests, self._cancel_flags(requests)) if flag]
        for request_id in cancelled:
            self.engine.cancel(request_id, "cancelled")

    def _cancel_flags(self, requests: list[Request]) -> list[bool]:
        """Whether each request has a cancel flag that may stop it, in one round trip."""
        flags = toolkit.mget_any(self.redis, [self.keys.cancelled(r.id) for r in requests])
        return [toolkit.cancel_matches(r, flag) for r, flag in zip(requests, flags)]

    # -- stepping -------------------------------------------------------------
    def _step(self) -> None:
        engine, series = self.engine, self._series
        started, waited = time.perf_counter(), engine.device_wait_s
        try:
            outputs = engine.step()
        except Exception:
            log.exception("engine step failed; handing its requests back")
            self._hand_back_all("engine failure on worker " + self.config.worker_id, count_attempt=True)
            return
        series.step_duration.observe(time.perf_counter() - started)
        series.device_wait.inc(max(0.0, engine.device_wait_s - waited))
        series.count_engine_stats(engine.stats())
        series.step_batch_size.observe(engine.num_running + sum(1 for o in outputs if o.finished))
        now = self.clock()
        events, finished = [], []
        for output in outputs:
            held = self.holdings.requests.get(output.request_id)
            if held is None:
                continue
            if output.new_token_ids or output.text:
                events.append((held, self._token_event(held, output, now)))
            if output.finished:
                finished.append((held, self._final_result(held, output, now)))
        self._publish(events, finished, read_jobs=True, overlap=True)

    def _token_event(self, held: Held, output: StepOutput, now: float):
        if output.new_token_ids:
            if held.first_token_at is None:
                self._series.time_to_first_token.observe(max(0.0, now - held.request.submitted_at))
            elif held.last_token_at is not None:
                gap = (now - held.last_token_at) / len(output.new_token_ids)
                for _ in output.new_token_ids:
                    self._series.inter_token_latency.observe(gap)
        return held.add_tokens(output.new_token_ids, output.text, now, output.logprobs)

    def _final_result(self, held: Held, output: StepOutput, now: float) -> Result:
        if output.score is not None:
            return held.score_result(held.score_item, output.score, now, self.config.worker_id)
        return held.result(output, now, self.config.worker_id)

    # -- publishing ---------------------------------------------------------------
    def _publish(self, events: list, finished: list[tuple[Held, Result]], read_jobs: bool = False,
                 overlap: bool = False) -> None:
        """Token events and final results (with the acks of the jobs they complete and a due
        heartbeat) in one round trip; with read_jobs the next jobs too, taken at the next
        iteration. With overlap the outbox sends it while the caller goes on to the next
        engine step; it is booked before the next one is built."""
        try:
            self._book_in_flight()
        except redis.RedisError:
            # The parcel in flight failed (Redis restarted, a failover): these final results
            # exist nowhere else, as the engine has let their requests go; keep them with the
            # failed parcel's, to be stored after the reconnect.
            self.outbox.keep(finished)
            raise
        if not events and not finished:
            return
        parcel = Parcel(events, finished, self.holdings.jobs_closed_by(finished), self._beat_to_send(),
                        JOBS_PER_READ if read_jobs and not self._draining else 0)
        if overlap:
            self.outbox.post(parcel)
        else:
            self._book(self.outbox.send(parcel))

    def _store_results(self, finished: list[tuple[Held, Result]]) -> None:
        """Store and publish final results, then acknowledge the jobs they close."""
        self._publish([], finished)

    def _book_in_flight(self) -> None:
        self._book(self.outbox.collect())

    def _book(self, receipt: Receipt | None) -> None:
        if receipt is None:
            return
        if receipt.parcel.read_jobs:
            self._jobs_in_hand.append(receipt.jobs)
        if self.config.abandoned_after_s:
            self._cancel_abandoned(receipt.heard)
        for (held, result), outcome in zip(receipt.parcel.finished, receipt.outcomes):
            self._count_finish(held, result, outcome)
            self.holdings.delivered(held)

    def _cancel_abandoned(self, heard: list[tuple[Held, int]]) -> None:
        """Free the slots of requests whose callers stopped listening long ago."""
        now = self.clock()
        for held, listeners in heard:
            silent = held.unheard_for(listeners, now, self.config.abandoned_after_s)
            if silent is not None:
                log.info("request %s: nobody has listened for %.0fs; cancelling it", held.request.id, silent)
                self.engine.cancel(held.request.id, "cancelled")

    def _count_finish(self, held: Held, result: Result, outcome) -> None:
        series = self._series
        if outcome == -1:
            series.results_fenced.inc()
            log.warning("request %s now belongs to another worker; dropped this worker's result", held.request.id)
            return
        series.finished(result.finish_reason).inc()
        if result.error is not None:
            series.error(result.error.type).inc()
        series.prompt_tokens.inc(result.usage.prompt_tokens)
        series.generation_tokens.inc(result.usage.completion_tokens)
        series.e2e_latency.observe(result.timings.total_s)
        if held.first_token_at is not None:
            # vLLM's prefill and decode times. A request that waited in this engine's own
            # queue (the prefetch) counts that wait as prefill: queue time ends at admission.
            series.prefill_time.observe(max(0.0, held.first_token_at - held.admitted_at))
            series.decode_time.observe(max(0.0, held.last_token_at - held.first_token_at))

    def _ack_jobs(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        by_shard: dict[int, list[str]] = {}
        for ref in entry_ids:
            shard, entry_id = parse_job_ref(ref)
            by_shard.setdefault(shard, []).append(entry_id)
        for shard, ids in by_shard.items():
            stream = self.streams[shard]
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, WORKER_GROUP, *ids)
                pipe.xdel(stream, *ids)
                pipe.execute()
        self.holdings.jobs_acked(entry_ids)

    # -- heartbeat -------------------------------------------------------------
    def _heartbeat(self, force: bool = False) -> None:
        if self.outbox.in_flight and not force:
            return  # the next step's parcel carries a due beat; one sent now could land before an older one
        self._book_in_flight()
        beat = self._beat_to_send(force)
        if beat is not None:
            self.outbox.send(Parcel(beat=beat))

    def _beat_to_send(self, force: bool = False) -> Heartbeat | None:
        """The heartbeat due now, counted as sent (None when none is due): the next parcel
        must not carry another before this one is booked; if its send fails, the reconnect
        beats anyway."""
        now, room = self.clock(), self.can_take()
        if not (force or self.advertised.is_due(now, room, self.holdings.last_job_read, self.engine.has_work())):
            return None
        engine = self.engine
        free = free_slots(engine.total_slots, engine.num_running, engine.num_waiting)
        beat = Heartbeat(
            v=PROTOCOL_VERSION, worker_id=self.config.worker_id, model=engine.model_name,
            engine=engine.name, total_slots=engine.total_slots, free_slots=0 if self._draining else free,
            can_take=0 if self._draining else room,
            running=engine.num_running, waiting=engine.num_waiting, kv_cache_usage=engine.kv_cache_usage,
            pinned_blocks=engine.pinned_blocks,
            last_job_read=self.holdings.last_job_read, contrast_model=engine.contrast_model_name,
            models=self.served_models, tokenizer=self.tokenizer.info, lease_ms=self.config.lease_ms, host=socket.gethostname(), pid=os.getpid(),
            started_at=self.started_at, sent_at=now, shards=self.keys.shards)
        self.advertised.sent(beat)
        self._series.heartbeats.inc()
        self._series.requests_running.set(beat.running)
        self._series.requests_waiting.set(beat.waiting)
        self._series.kv_cache_usage.set(beat.kv_cache_usage)
        self._series.pinned_blocks.set(beat.pinned_blocks)
        return beat

    # -- shutdown ---------------------------------------------------------------
    def _drain(self) -> None:
        """Finish what is running for drain_timeout_s, then hand the rest back."""
        self._draining = True
        self.state.set("draining")
        log.info("worker %s draining: %d requests in flight", self.config.worker_id, len(self.holdings.requests))
        give_up = time.monotonic() + self.config.drain_timeout_s
        try:
            undelivered = self.outbox.take_undelivered()
            if undelivered:
                self._store_results(undelivered)
            if self._scoring:
                self._score()
            self._heartbeat(force=True)  # advertise no free slots
            while self.engine.has_work() and time.monotonic() < give_up:
                self._apply_cancels()
                self._lease.progress()
                self._step()
            self._hand_back_unread_jobs()
            self._hand_back_all(f"worker {self.config.worker_id} shut down", count_attempt=False)
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.heartbeat(self.config.worker_id))
                pipe.zrem(self.keys.workers, self.config.worker_id)
                pipe.execute()
            with self.redis.pipeline(transaction=False) as pipe:  # one slot each on a cluster
                for stream in self.streams:
                    pipe.delete(stream)
                pipe.execute()
        except CONNECTION_LOST as exc:
            log.warning("could not drain cleanly (%s); schedulers will reclaim this worker's jobs", exc)
        finally:
            self._lease.stop()
            self.outbox.close()
            self._cancels.close()
        log.info("worker %s stopped", self.config.worker_id)

    def _hand_back_unread_jobs(self) -> None:
        """Jobs dispatched to us that we never read go back too."""
        self._book_in_flight()
        unread = [(stream, entry) for stream in self.streams for entry in self.redis.xrange(stream, "-", "+")]
        for stream, (entry_id, fields) in unread:
            entry_id = self._job_ref(stream, entry_id)
            if self.holdings.is_open(entry_id):
                continue
            job = toolkit.read_job(entry_id, fields, f"worker {self.config.worker_id}")
            if job is None:
                continue
            self._hand_back(job.requests, "worker shut down before starting it", count_attempt=False)
            self._ack_jobs([entry_id])

    def _hand_back_all(self, reason: str, count_attempt: bool) -> None:
        self._book_in_flight()
        requests = [held.request for held in self.holdings.requests.values()]
        for request_id in self.holdings.requests:
            self.engine.cancel(request_id, "cancelled")
        if self.engine.has_work():
            self.engine.step()  # evicts the cancelled requests; their output is not sent
        self._hand_back(requests, reason, count_attempt)
        self._ack_jobs(list(self.holdings.jobs_open))
        self.holdings.requests.clear()
        self._scoring.clear()

    def _hand_back(self, requests: list[Request], reason: str, count_attempt: bool) -> None:
        # The schedulers' --max-attempts, so a request dead-letters after as many failures either way.
        recovery.hand_back(self.redis, self.keys, requests, reason,
                           max_attempts=toolkit.read_max_attempts(self.redis, self.keys),
                           result_ttl_s=self.config.result_ttl_s, count_attempt=count_attempt,
                           worker_id=self.config.worker_id)


class _ServedTokenizer:
    """The engine's tokenizer as callers get it: its fingerprint for the heartbeat and its files
    at Keys.tokenizer(model) for each served name, which every heartbeat keeps alive (the outbox
    refreshes their expiry)."""

    def __init__(self, tokenizer, keys: list[str]):
        self.info = tokenizers.describe(tokenizer) if tokenizer is not None else None
        self._fields = tokenizers.stored_fields(tokenizer, self.info) if tokenizer is not None else {}
        self.keys = keys if tokenizer is not None else []

    def store(self, client: redis.Redis) -> None:
        """Write the files (at start and after a reconnect: Redis may have restarted empty)."""
        if not self.keys:
            return
        with client.pipeline(transaction=False) as pipe:
            for key in self.keys:
                pipe.hset(key, mapping=self._fields)
                pipe.pexpire(key, tokenizers.TOKENIZER_TTL_MS)
            pipe.execute()
