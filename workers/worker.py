"""The worker daemon: moves bytes between Redis and an engine.

It reads jobs from its own stream, admits their requests into the engine,
and after every engine step publishes the new tokens on each request's
channel (one round trip for the whole step). A finished request's result is
stored and published atomically with a lease check, and only then is the job
acknowledged: a worker killed at any point leaves its job on the stream for a
scheduler to re-dispatch, and a worker that wakes from a pause past its lease
cannot deliver a second result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import redis

from batchd import metrics
from batchd.client import recovery, scripts
from batchd.client.connection import connect, instance_id, redact
from batchd.client.errors import BatchdError, Cancelled, DeadlineExceeded, InvalidRequest
from batchd.client.keys import WORKER_GROUP, Keys
from batchd.client.protocol import (
    PROTOCOL_VERSION,
    ErrorInfo,
    FinalEvent,
    Heartbeat,
    Request,
    RestartEvent,
    Result,
    Timings,
    TokenEvent,
    Usage,
    decode_job,
    encode,
    error_result,
)

from .cancels import CancelFeed
from .engine import Engine, EngineRequest, StepOutput

if TYPE_CHECKING:  # scoring imports torch; an echo worker runs without it
    from .scoring import ScoreItem, ScoreOutput

log = logging.getLogger("batchd.worker")

# Redis checks blocked commands' timeouts once per server tick (1000 / hz ms).
SERVER_TICK_MS = 100
# How often an idle worker that owes schedulers a heartbeat looks for jobs meanwhile.
POLL_INTERVAL_MS = 1
# Job stream entries read at once.
JOBS_PER_READ = 64

SCRIPTS = {"finalize": scripts.FINALIZE, "publish": scripts.PUBLISH_STEP}


@dataclass
class WorkerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "batchd:"
    worker_id: str = field(default_factory=instance_id)
    heartbeat_interval_s: float = 1.0
    # A worker silent for this long is declared dead and its requests re-dispatched.
    lease_ms: int = 5000
    result_ttl_s: int = 3600
    max_attempts: int = 3
    # On SIGTERM, finish in-flight requests for this long, then hand the rest back.
    drain_timeout_s: float = 30.0
    # A step may take longer than the lease (a long prefill, a loaded CPU): a
    # side thread keeps the lease alive while the main loop is making progress,
    # and lets it lapse once the loop has been stuck this long.
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
    metrics_port: int = 0


@dataclass
class _Pipeline:
    """One round trip of the worker: script calls, and what to book when it returns."""

    calls: list[tuple[str, list, list]]
    groups: list[list]  # token events per lease token, in call order
    finished: list  # (tracked, result) of the FINALIZE calls after them
    beat: Heartbeat | None
    read_jobs: bool


@dataclass
class _Tracked:
    """A request this worker holds: where it came from and what it produced."""

    request: Request
    job_entry: str
    owner: str
    admitted_at: float
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Since when no subscriber received this request's token events.
    unheard_since: float | None = None
    # A scoring request the engine runs in its steps: what it asked (ScoreItem).
    score_item: Any = None


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, client: redis.Redis | None = None, clock=time.time):
        self.config = config
        self.engine = engine
        self.keys = Keys(config.prefix)
        self.redis = client or connect(config.redis_url)
        self.clock = clock
        self.stream = self.keys.jobs(config.worker_id)
        self.tracked: dict[str, _Tracked] = {}
        self.jobs_open: dict[str, set[str]] = {}
        self.last_job_read = "0-0"
        self._series = metrics.WorkerSeries(config.worker_id, engine.model_name)
        self._stop = threading.Event()
        self._draining = False
        self._next_heartbeat = 0.0
        self._last_free_slots = -1
        self._advertised_job_read = "0-0"
        self._cancels = CancelFeed(self.redis, self.keys.cancel_channel, self.stream)
        self._scripts: dict[str, str] = {}
        # Final results computed while Redis was unreachable; stored first thing once it is back.
        self._undelivered: list[tuple[_Tracked, Result]] = []
        # XREADGROUP replies (or errors) that came back with step pipelines, not yet taken.
        # A list: two pipelines can be booked before the next take (one by a step, one
        # when the engine then runs dry), and a reply dropped is a job never run.
        self._jobs_in_hand: list = []
        # A step's pipeline goes out on this thread while the engine runs the next step.
        self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchd-publish")
        self._in_flight: tuple[_Pipeline, concurrent.futures.Future] | None = None
        self.started_at = clock()
        self._last_progress = time.monotonic()
        self._lease_done = threading.Event()  # set once drained: the lease may lapse
        # Scoring requests read this iteration: answered together in one forward pass.
        self._scoring: list[tuple[_Tracked, ScoreItem]] = []

    # -- lifecycle --------------------------------------------------------
    def stop(self) -> None:
        """Begin a graceful drain (SIGTERM)."""
        self._stop.set()

    def run(self) -> None:
        cfg = self.config
        log.info("worker starting: id=%s engine=%s model=%s slots=%d redis=%s lease_ms=%d "
                 "drain_timeout_s=%s metrics_port=%s", cfg.worker_id, self.engine.name, self.engine.model_name,
                 self.engine.total_slots, redact(cfg.redis_url), cfg.lease_ms, cfg.drain_timeout_s,
                 cfg.metrics_port)
        metrics.serve(cfg.metrics_port, metrics.WORKER_REGISTRY)
        self._connect()
        threading.Thread(target=self._keep_lease, name="batchd-lease", daemon=True).start()
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unreachable (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                self._reconnect()
        self._drain()

    def _connect(self) -> None:
        try:
            self._finish_publishing()
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # its results wait in _undelivered
        self._load_scripts()
        try:
            self.redis.xgroup_create(self.stream, WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._cancels.connect()
        self._jobs_in_hand = []  # whatever it held is on the pending list, read next
        self._read_pending_jobs()
        self._heartbeat(force=True)

    def _read_pending_jobs(self) -> None:
        """Jobs Redis delivered to this worker id but that it never finished reading or acking.

        A reply lost to a dropped connection, or a restart under the same
        --worker-id, leaves them in the group's pending list, where `>` never
        returns them again.
        """
        reply = self.redis.xreadgroup(WORKER_GROUP, self.config.worker_id, {self.stream: "0"}, count=10_000)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                entry_id = entry_id.decode()
                if entry_id not in self.jobs_open:
                    self._admit_job(entry_id, fields)
                elif not self.jobs_open[entry_id]:
                    self._ack_jobs([entry_id])  # finished, but the ack was lost

    def _reconnect(self) -> None:
        try:
            self._connect()
        except (redis.ConnectionError, redis.TimeoutError):
            pass

    # -- one iteration -------------------------------------------------------
    def run_once(self) -> None:
        self._last_progress = time.monotonic()
        if not self.engine.has_work():
            self._finish_publishing()  # before waiting for jobs: book the last step, free its slots
        if self._undelivered:
            finished, self._undelivered = self._undelivered, []
            self._deliver(finished)
        busy = self.engine.has_work()
        if not self._draining:
            # The step pipelines read the job stream too: take what they found,
            # and wait for more only when there is nothing else to do.
            in_hand, self._jobs_in_hand = self._jobs_in_hand, []
            found = False
            for reply in in_hand:
                if not self._take_jobs(reply):
                    break  # re-registered: what the others hold is on the pending list, read already
                found = found or bool(reply)
            if not in_hand or not (found or self.engine.has_work()):
                self._read_jobs(block_ms=None if busy else self._idle_block_ms())
        self._apply_cancels()
        if self._scoring:
            self._score()
        if self.engine.has_work():
            self._step()
        self._heartbeat()

    def _idle_block_ms(self) -> int:
        """Wait for jobs, but wake in time to advertise slots that just freed up."""
        if self._beat_is_stale():
            return max(1, int((self._next_heartbeat - self.config.heartbeat_interval_s + 0.02 - self.clock()) * 1000))
        # Nothing to advertise: block until the next periodic beat. A new job
        # wakes the read at once, so a long block costs no latency, and a
        # short one would be a busy poll (see SERVER_TICK_MS).
        return max(SERVER_TICK_MS, int((self._next_heartbeat - self.clock()) * 1000))

    def _beat_is_stale(self) -> bool:
        """Schedulers see other free slots, or count jobs this worker already read as still queued."""
        return self.capacity() != self._last_free_slots or self.last_job_read != self._advertised_job_read

    def _read_jobs(self, block_ms: int | None) -> None:
        try:
            # Redis times out a BLOCK only on its cron tick (100 ms at the default hz 10):
            # a shorter wait is a poll, so a due heartbeat is not held up by a tick.
            poll = block_ms is not None and block_ms < SERVER_TICK_MS
            reply = self.redis.xreadgroup(WORKER_GROUP, self.config.worker_id, {self.stream: ">"},
                                          count=JOBS_PER_READ, block=None if poll else block_ms)
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
            log.warning("job stream %s was reclaimed (this worker was presumed dead); re-registering",
                        self.stream)
            self._forget_reclaimed()
            self._connect()
            return False
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._admit_job(entry_id.decode(), fields)
        return True

    def _forget_reclaimed(self) -> None:
        """Drop the requests a scheduler took back: their slots are freed, their output never sent."""
        self._finish_publishing()  # its results are fenced now; book them before forgetting
        for request_id in self.tracked:
            self.engine.cancel(request_id, "cancelled")
        self.tracked.clear()
        self.jobs_open.clear()
        self._undelivered.clear()
        self._scoring.clear()

    def _admit_job(self, entry_id: str, fields: dict) -> None:
        if entry_id in self.jobs_open:
            return  # read twice (a pipelined read and the re-read after a reconnect): it is running
        self.last_job_read = entry_id
        try:
            job = decode_job(fields[b"job"])
        except (KeyError, msgspec.MsgspecError, BatchdError) as exc:
            log.error("dropping unreadable job %s: %s", entry_id, exc)
            self._ack_jobs([entry_id])
            return
        # Read the cancel flags before the job is marked open: if Redis drops
        # here, the entry stays unknown to this worker and is read again from
        # the group's pending list on reconnect, instead of looking finished.
        fresh = [r for r in job.requests if r.id not in self.tracked]  # a redelivered request already runs here
        if fresh and self._cancels.needs_flags(entry_id):
            cancelled = self._cancel_flags([r.id for r in fresh])
        else:
            cancelled = [self._cancels.heard(r.id) for r in fresh]
        # Every request keeps its job open until its outcome is stored, refused ones included.
        self.jobs_open[entry_id] = {r.id for r in fresh}
        now = self.clock()
        restarts, refused = [], []
        for request, cancel_flag in zip(fresh, cancelled):
            tracked, refusal = self._admit(entry_id, request, now, cancelled=cancel_flag)
            if refusal is not None:
                refused.append((tracked, refusal))
            elif request.attempt > 0:
                restarts.append((tracked, RestartEvent(attempt=request.attempt,
                                                       reason="resumed on worker " + self.config.worker_id)))
        self._publish_step(restarts, refused)
        self._close_job_if_done(entry_id)

    def _admit(self, entry_id: str, request: Request, now: float, cancelled: bool) -> tuple[_Tracked, Result | None]:
        """Hand one request to the engine (no I/O); returns its refusal when it cannot run."""
        owner = scripts.owner_token(self.config.worker_id, request.attempt)
        tracked = _Tracked(request, entry_id, owner, now)
        try:
            if cancelled:
                raise Cancelled(f"request {request.id} was cancelled before it started", request.id)
            if request.deadline is not None and request.deadline <= now:
                raise DeadlineExceeded(f"request {request.id} expired before a slot was free; "
                                       "raise its timeout or add workers", request.id)
            if request.task == "generate":
                prompt = self.engine.tokenize(request)
                self.engine.add(EngineRequest(request.id, prompt, request.params, request.deadline, now))
            else:
                item = self._scorer(request).prepare(request)
                if getattr(self.engine, "scores_in_steps", False):
                    # Prefill-only rows in the engine's own steps, beside generate requests,
                    # reusing a cached prefix where a slot still holds one.
                    tracked.score_item = item
                    self.engine.add_score(EngineRequest(request.id, item.prompt_token_ids, request.params,
                                                        request.deadline, now), item)
                else:
                    self._scoring.append((tracked, item))
        except BatchdError as exc:
            reason = {"cancelled": "cancelled", "deadline_exceeded": "deadline"}.get(exc.code, "error")
            return tracked, error_result(request.id, exc, reason, request.submitted_at, self.config.worker_id)
        except Exception as exc:  # a bug or a tokenizer crash must cost one request, not the worker
            log.exception("could not admit request %s", request.id)
            return tracked, error_result(
                request.id, BatchdError(f"worker could not admit the request: {type(exc).__name__}: {exc}"),
                "error", request.submitted_at, self.config.worker_id)
        self.tracked[request.id] = tracked
        self._series.queue_time.observe(max(0.0, now - request.submitted_at))
        return tracked, None

    def _scorer(self, request: Request):
        scorer = getattr(self.engine, "scorer", lambda: None)()
        if scorer is None:
            raise InvalidRequest(f"the {self.engine.name} engine has no model: it cannot answer "
                                 f"{request.task} requests", request.id)
        return scorer

    # -- scoring ----------------------------------------------------------------
    def _score(self) -> None:
        """All scoring requests read this iteration, as one batched forward pass between engine steps."""
        batch, self._scoring = self._scoring, []
        try:
            outputs = self.engine.scorer().score([item for _tracked, item in batch])
        except Exception as exc:  # a failed pass (out of memory) costs its requests, not the worker
            log.exception("scoring %d requests failed", len(batch))
            error = BatchdError(f"worker could not score the request: {type(exc).__name__}: {exc}")
            self._deliver([(tracked, error_result(tracked.request.id, error, "error", tracked.request.submitted_at,
                                                  self.config.worker_id)) for tracked, _item in batch])
            return
        now = self.clock()
        self._deliver([(tracked, self._score_result(tracked, item, output, now))
                       for (tracked, item), output in zip(batch, outputs)])

    def _score_result(self, tracked: _Tracked, item: ScoreItem, output: ScoreOutput, now: float) -> Result:
        request = tracked.request
        submitted = request.submitted_at or tracked.admitted_at
        vector = output.next_token_logprobs
        return Result(
            request_id=request.id,
            finish_reason="stop",
            usage=Usage(prompt_tokens=len(item.prompt_token_ids) + len(item.continuation_token_ids or ())),
            timings=Timings(queued_s=max(0.0, tracked.admitted_at - submitted), total_s=max(0.0, now - submitted)),
            worker=self.config.worker_id,
            attempt=request.attempt,
            logprobs=None if vector is None else vector.numpy().astype("<f4").tobytes(),
            top_token_ids=output.top_token_ids,
            top_logprobs=output.top_logprobs,
            token_logprobs=output.token_logprobs,
            total_logprob=output.total_logprob)

    # -- cancellation -----------------------------------------------------------
    def _apply_cancels(self) -> None:
        cancelled, resynced = self._cancels.poll()
        if resynced and self.tracked:
            # Back after a gap in the subscription: a cancel may have been missed meanwhile.
            held = list(self.tracked)
            cancelled += [request_id for request_id, flag in zip(held, self._cancel_flags(held)) if flag]
        for request_id in cancelled:
            if request_id in self.tracked:
                self.engine.cancel(request_id, "cancelled")

    def _cancel_flags(self, request_ids: list[str]) -> list[bool]:
        """Whether each request's cancel flag is set, in one round trip."""
        return [flag is not None for flag in self.redis.mget([self.keys.cancelled(r) for r in request_ids])]

    # -- stepping -------------------------------------------------------------
    def _step(self) -> None:
        started, waited = time.perf_counter(), getattr(self.engine, "device_wait_s", 0.0)
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; handing its requests back")
            self._hand_back_all("engine failure on worker " + self.config.worker_id, count_attempt=True)
            return
        self._series.step_duration.observe(time.perf_counter() - started)
        self._series.device_wait.inc(max(0.0, getattr(self.engine, "device_wait_s", 0.0) - waited))
        self._series.step_batch_size.observe(self.engine.num_running + len(
            [o for o in outputs if o.finished]))
        now = self.clock()
        events, finished = [], []
        for output in outputs:
            tracked = self.tracked.get(output.request_id)
            if tracked is None:
                continue
            if output.new_token_ids or output.text:
                events.append((tracked, self._token_event(tracked, output, now)))
            if output.finished:
                result = (self._score_result(tracked, tracked.score_item, output.score, now)
                          if output.score is not None else self._result(tracked, output, now))
                finished.append((tracked, result))
        self._publish_step(events, finished, read_jobs=True, overlap=True)

    def _token_event(self, tracked: _Tracked, output: StepOutput, now: float) -> TokenEvent:
        index = len(tracked.token_ids)
        if output.new_token_ids:
            if tracked.first_token_at is None:
                tracked.first_token_at = now
                self._series.time_to_first_token.observe(
                    max(0.0, now - tracked.request.submitted_at))
            elif tracked.last_token_at is not None:
                gap = (now - tracked.last_token_at) / len(output.new_token_ids)
                for _ in output.new_token_ids:
                    self._series.inter_token_latency.observe(gap)
            tracked.last_token_at = now
        tracked.token_ids.extend(output.new_token_ids)
        tracked.text.append(output.text)
        return TokenEvent(index=index, token_ids=output.new_token_ids, text=output.text)

    def _result(self, tracked: _Tracked, output: StepOutput, now: float) -> Result:
        request = tracked.request
        submitted = request.submitted_at or tracked.admitted_at
        error = None
        if output.error is not None:
            error = ErrorInfo(type=output.error.code, message=output.error.message)
        return Result(
            request_id=request.id,
            finish_reason=output.finish_reason,
            text="".join(tracked.text),
            token_ids=list(tracked.token_ids),
            usage=Usage(prompt_tokens=output.prompt_tokens, completion_tokens=len(tracked.token_ids)),
            timings=Timings(
                queued_s=max(0.0, tracked.admitted_at - submitted),
                first_token_s=None if tracked.first_token_at is None else max(0.0, tracked.first_token_at - submitted),
                total_s=max(0.0, now - submitted)),
            error=error,
            worker=self.config.worker_id,
            attempt=request.attempt)

    def _publish_step(self, events: list, finished: list, read_jobs: bool = False, overlap: bool = False) -> None:
        """A step's token events, final results, job acks and heartbeat in one round trip,
        and with read_jobs the next jobs too (taken at the start of the next iteration).

        The pipeline runs in order, so a request's last tokens reach its
        channel before its final event; a job is acked inside the script that
        stores its last result. With overlap the pipeline is sent from the
        publisher thread while the caller goes on to the next engine step, and
        booked just before the next pipeline is built (at most one in flight,
        so every pipeline is built from booked state).
        """
        self._finish_publishing()
        pipeline = self._build_pipeline(events, finished, read_jobs and not self._draining)
        if pipeline is None:
            return
        if overlap:
            self._in_flight = (pipeline, self._publisher.submit(self._send_pipeline, pipeline))
            return
        self._book(pipeline, self._sent(pipeline, lambda: self._send_pipeline(pipeline)))

    def _build_pipeline(self, events: list, finished: list, read_jobs: bool) -> _Pipeline | None:
        # One publish call per lease token (requests of one attempt share it).
        by_owner: dict[str, list] = {}
        for tracked, event in events:
            by_owner.setdefault(tracked.owner, []).append((tracked, event))
        calls = []
        for token, group in by_owner.items():
            args = [token]
            for tracked, event in group:
                args += [self.keys.channel(tracked.request.id), encode(event)]
            calls.append(("publish", [self.keys.owner(t.request.id) for t, _ in group], args))
        if not calls and not finished:
            return None
        closing = self._jobs_closed_by(finished)
        for tracked, result in finished:
            ack = (self.stream, WORKER_GROUP, tracked.job_entry) if closing.get(tracked.job_entry) is tracked else None
            keys, args = scripts.finalize_keys_args(self.keys, tracked.request.id, encode(FinalEvent(result)),
                                                    self.config.result_ttl_s, tracked.owner, ack)
            calls.append(("finalize", keys, args))
        beat = self._due_beat()
        if beat is not None:
            # Counted as sent now, so the next step's pipeline does not carry another before this
            # one is booked; if the send fails, the reconnect beats anyway.
            self._beat_sent(beat)
        return _Pipeline(calls, list(by_owner.values()), finished, beat, read_jobs)

    def _send_pipeline(self, pipeline: _Pipeline) -> tuple[list, object]:
        return self._run_scripts(pipeline.calls, pipeline.beat, pipeline.read_jobs)

    def _sent(self, pipeline: _Pipeline, send) -> tuple[list, object]:
        """send()'s replies; if the connection dropped, the results wait to be stored after the reconnect."""
        try:
            return send()
        except (redis.ConnectionError, redis.TimeoutError):
            self._undelivered.extend(pipeline.finished)
            raise

    def _finish_publishing(self) -> None:
        """Wait for the pipeline in flight, if any, and book what it did."""
        if self._in_flight is None:
            return
        pipeline, future = self._in_flight
        self._in_flight = None
        self._book(pipeline, self._sent(pipeline, future.result))

    def _book(self, pipeline: _Pipeline, replies: tuple[list, object]) -> None:
        outcomes, jobs = replies
        if pipeline.read_jobs:
            self._jobs_in_hand.append(jobs)
        groups = pipeline.groups
        heard, finals = outcomes[:len(groups)], outcomes[len(groups):]
        if groups:
            self._cancel_abandoned(groups, heard)
        if pipeline.finished:
            self._close_finished(pipeline.finished, finals)

    def _cancel_abandoned(self, groups: list[list], heard: list[list[int]]) -> None:
        """Free the slots of requests whose callers stopped listening long ago."""
        if not self.config.abandoned_after_s:
            return
        now = self.clock()
        for group, counts in zip(groups, heard):
            for (tracked, _event), listeners in zip(group, counts):
                if listeners != 0:
                    tracked.unheard_since = None
                elif tracked.unheard_since is None:
                    tracked.unheard_since = now
                elif now - tracked.unheard_since >= self.config.abandoned_after_s:
                    log.info("request %s: nobody has listened for %.0fs; cancelling it",
                             tracked.request.id, now - tracked.unheard_since)
                    self.engine.cancel(tracked.request.id, "cancelled")
                    tracked.unheard_since = now  # once per period, not every step

    def _deliver(self, finished: list[tuple[_Tracked, Result]]) -> None:
        """Store and publish final results, then acknowledge the jobs they close."""
        self._publish_step([], finished)

    def _jobs_closed_by(self, finished: list[tuple[_Tracked, Result]]) -> dict[str, _Tracked]:
        """The jobs these results complete, each with the request whose result completes it."""
        left: dict[str, set[str]] = {}
        closing = {}
        for tracked, _result in finished:
            open_ids = self.jobs_open.get(tracked.job_entry)
            if open_ids is None or tracked.request.id not in open_ids:
                continue
            remaining = left.setdefault(tracked.job_entry, set(open_ids))
            remaining.discard(tracked.request.id)
            if not remaining:
                closing[tracked.job_entry] = tracked
        return closing

    def _close_finished(self, finished: list[tuple[_Tracked, Result]], outcomes: list) -> None:
        """Book the delivered results; the jobs they completed were acked with them."""
        for (tracked, result), outcome in zip(finished, outcomes):
            self._count_finish(tracked, result, outcome)
            self.tracked.pop(tracked.request.id, None)
            open_ids = self.jobs_open.get(tracked.job_entry)
            if open_ids is not None and tracked.request.id in open_ids:
                open_ids.discard(tracked.request.id)
                if not open_ids:
                    del self.jobs_open[tracked.job_entry]

    def _load_scripts(self) -> None:
        self._scripts = {name: self.redis.script_load(body) for name, body in SCRIPTS.items()}

    def _run_scripts(self, calls: list[tuple[str, list, list]], beat: Heartbeat | None = None,
                     read_jobs: bool = False) -> tuple[list, object]:
        """Run script calls (and a heartbeat, and a read of the job stream) in one pipeline;
        reload and rerun any script Redis forgot (restart). Returns the scripts' outcomes
        and the read's reply (None when not asked)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                pipe.evalsha(self._scripts[name], len(keys), *keys, *args)
            if beat is not None:
                self._queue_beat(pipe, beat)
            if read_jobs:
                pipe.xreadgroup(WORKER_GROUP, self.config.worker_id, {self.stream: ">"}, count=JOBS_PER_READ)
            replies = pipe.execute(raise_on_error=False)
        outcomes, jobs = replies[:len(calls)], replies[-1] if read_jobs else None
        if isinstance(jobs, (redis.ConnectionError, redis.TimeoutError)):
            raise jobs
        for outcome in outcomes:
            if isinstance(outcome, (redis.ConnectionError, redis.TimeoutError)):
                raise outcome
        lost = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, redis.exceptions.NoScriptError)]
        if lost:
            self._load_scripts()
            for i in lost:
                name, keys, args = calls[i]
                outcomes[i] = self.redis.evalsha(self._scripts[name], len(keys), *keys, *args)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes, jobs

    def _count_finish(self, tracked: _Tracked, result: Result, outcome) -> None:
        series = self._series
        if outcome == -1:
            series.results_fenced.inc()
            log.warning("request %s now belongs to another worker; dropped this worker's result",
                        tracked.request.id)
            return
        series.finished(result.finish_reason).inc()
        if result.error is not None:
            series.error(result.error.type).inc()
        series.prompt_tokens.inc(result.usage.prompt_tokens)
        series.generation_tokens.inc(result.usage.completion_tokens)
        series.e2e_latency.observe(result.timings.total_s)

    def _close_job_if_done(self, entry_id: str) -> None:
        """Ack a job that holds nothing left to run (every request a duplicate of one running here)."""
        if entry_id in self.jobs_open and not self.jobs_open[entry_id]:
            self._ack_jobs([entry_id])

    def _ack_jobs(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, WORKER_GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()
        for entry_id in entry_ids:
            self.jobs_open.pop(entry_id, None)

    # -- heartbeat -------------------------------------------------------------
    def capacity(self) -> int:
        """Requests this worker can take now: free slots plus room in its prefetch queue."""
        engine = self.engine
        prefetch = self.config.prefetch if self.config.prefetch is not None else max(1, engine.total_slots // 2)
        return max(0, engine.total_slots + prefetch - engine.num_running - engine.num_waiting)

    def _keep_lease(self) -> None:
        """Extend the heartbeat's expiry during long steps; the main loop owns its content."""
        key = self.keys.heartbeat(self.config.worker_id)
        while not self._lease_done.wait(self.config.heartbeat_interval_s):
            if time.monotonic() - self._last_progress > self.config.stall_timeout_s:
                log.error("worker loop stuck for over %.0fs; letting the lease lapse so schedulers reclaim "
                          "its requests", self.config.stall_timeout_s)
                continue
            try:
                self.redis.pexpire(key, self.config.lease_ms)
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # the main loop reports and reconnects

    def _heartbeat(self, force: bool = False) -> None:
        if self._in_flight is not None and not force:
            return  # the next step's pipeline carries a due beat; one sent now could land before an older one
        beat = self._due_beat(force)
        if beat is None:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            self._queue_beat(pipe, beat)
            pipe.execute()
        self._beat_sent(beat)

    def _due_beat(self, force: bool = False) -> Heartbeat | None:
        """The heartbeat to send now, or None when none is due."""
        now = self.clock()
        # Beat as soon as free slots change (at most every 20 ms while busy), so schedulers
        # refill freed slots at once instead of at the next periodic beat.
        # A beat also tells schedulers which jobs this worker has read (last_job_read):
        # until it does, they count those jobs' requests against its free slots.
        # An idle worker beats at once: otherwise it would wait for jobs in short
        # polls until the 20 ms are up, which delays the next job at low load.
        changed = self._beat_is_stale() and (
            not self.engine.has_work() or now >= self._next_heartbeat - self.config.heartbeat_interval_s + 0.02)
        if not (force or changed or now >= self._next_heartbeat):
            return None
        return Heartbeat(
            v=PROTOCOL_VERSION, worker_id=self.config.worker_id, model=self.engine.model_name,
            engine=self.engine.name, total_slots=self.engine.total_slots,
            free_slots=0 if self._draining else self.capacity(),
            running=self.engine.num_running, waiting=self.engine.num_waiting,
            kv_cache_usage=self.engine.kv_cache_usage, last_job_read=self.last_job_read,
            contrast_model=getattr(self.engine, "contrast_model_name", ""),
            lease_ms=self.config.lease_ms, host=socket.gethostname(), pid=os.getpid(),
            started_at=self.started_at, sent_at=now)

    def _queue_beat(self, pipe, beat: Heartbeat) -> None:
        pipe.set(self.keys.heartbeat(self.config.worker_id), encode(beat), px=self.config.lease_ms)
        pipe.zadd(self.keys.workers, {self.config.worker_id: beat.sent_at})

    def _beat_sent(self, beat: Heartbeat) -> None:
        self._last_free_slots = beat.free_slots
        self._advertised_job_read = beat.last_job_read
        self._next_heartbeat = beat.sent_at + self.config.heartbeat_interval_s
        self._series.heartbeats.inc()
        self._series.requests_running.set(beat.running)
        self._series.requests_waiting.set(beat.waiting)
        self._series.kv_cache_usage.set(beat.kv_cache_usage)

    # -- shutdown ---------------------------------------------------------------
    def _drain(self) -> None:
        """Finish what is running for drain_timeout_s, then hand the rest back."""
        self._draining = True
        log.info("worker %s draining: %d requests in flight", self.config.worker_id, len(self.tracked))
        give_up = time.monotonic() + self.config.drain_timeout_s
        try:
            if self._undelivered:
                finished, self._undelivered = self._undelivered, []
                self._deliver(finished)
            if self._scoring:
                self._score()
            self._heartbeat(force=True)  # advertise no free slots
            while self.engine.has_work() and time.monotonic() < give_up:
                self._apply_cancels()
                self._last_progress = time.monotonic()
                self._step()
            self._read_remaining_jobs()
            self._hand_back_all(f"worker {self.config.worker_id} shut down", count_attempt=False)
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.heartbeat(self.config.worker_id))
                pipe.zrem(self.keys.workers, self.config.worker_id)
                pipe.delete(self.stream)
                pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("could not drain cleanly (%s); schedulers will reclaim this worker's jobs", exc)
        finally:
            self._lease_done.set()
            self._publisher.shutdown(wait=True)
            self._cancels.close()
        log.info("worker %s stopped", self.config.worker_id)

    def _read_remaining_jobs(self) -> None:
        """Jobs dispatched to us that we never read go back too."""
        self._finish_publishing()
        for entry_id, fields in self.redis.xrange(self.stream, "-", "+"):
            entry_id = entry_id.decode()
            if entry_id in self.jobs_open:
                continue
            try:
                job = decode_job(fields[b"job"])
            except (KeyError, msgspec.MsgspecError, BatchdError):
                continue
            recovery.hand_back(self.redis, self.keys, job.requests, "worker shut down before starting it",
                               max_attempts=self.config.max_attempts, result_ttl_s=self.config.result_ttl_s,
                               count_attempt=False, worker_id=self.config.worker_id)
            self._ack_jobs([entry_id])

    def _hand_back_all(self, reason: str, count_attempt: bool) -> None:
        self._finish_publishing()
        requests = [t.request for t in self.tracked.values()]
        for request_id in list(self.tracked):
            self.engine.cancel(request_id, "cancelled")
        if self.engine.has_work():
            self.engine.step()  # evicts the cancelled requests; their output is not sent
        recovery.hand_back(self.redis, self.keys, requests, reason, max_attempts=self.config.max_attempts,
                           result_ttl_s=self.config.result_ttl_s, count_attempt=count_attempt,
                           worker_id=self.config.worker_id)
        self._ack_jobs(list(self.jobs_open))
        self.tracked.clear()
        self._scoring.clear()
