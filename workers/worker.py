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

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import msgspec
import redis

from batchd import metrics
from batchd.client import recovery, scripts
from batchd.client.connection import connect, redact
from batchd.client.errors import BatchdError, Cancelled, DeadlineExceeded
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

from .engine import Engine, EngineRequest, StepOutput

log = logging.getLogger("batchd.worker")

SCRIPTS = {"finalize": scripts.FINALIZE, "publish": scripts.PUBLISH_STEP}


@dataclass
class WorkerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "batchd:"
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    heartbeat_interval_s: float = 1.0
    # A worker silent for this long is declared dead and its requests re-dispatched.
    lease_ms: int = 5000
    result_ttl_s: int = 3600
    max_attempts: int = 3
    # On SIGTERM, finish in-flight requests for this long, then hand the rest back.
    drain_timeout_s: float = 30.0
    metrics_port: int = 0


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
        self._labels = (config.worker_id, engine.model_name)
        self._stop = threading.Event()
        self._draining = False
        self._next_heartbeat = 0.0
        self._last_free_slots = -1
        self._pubsub = None
        self._scripts: dict[str, str] = {}
        self.started_at = clock()

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
        metrics.serve(cfg.metrics_port)
        self._connect()
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
        self._load_scripts()
        try:
            self.redis.xgroup_create(self.stream, WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if self._pubsub is not None:
            self._pubsub.close()
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(self.keys.cancel_channel)
        self._heartbeat(force=True)

    def _reconnect(self) -> None:
        try:
            self._connect()
        except (redis.ConnectionError, redis.TimeoutError):
            pass

    # -- one iteration -------------------------------------------------------
    def run_once(self) -> None:
        busy = self.engine.has_work()
        if not self._draining:
            self._read_jobs(block_ms=None if busy else 50)
        self._apply_cancels()
        if self.engine.has_work():
            self._step()
        self._heartbeat()

    def _read_jobs(self, block_ms: int | None) -> None:
        try:
            reply = self.redis.xreadgroup(WORKER_GROUP, self.config.worker_id, {self.stream: ">"},
                                          count=64, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Our stream was reaped while we were paused: we are a new worker now.
            log.warning("job stream %s was reclaimed (this worker was presumed dead); re-registering",
                        self.stream)
            self._connect()
            return
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._admit_job(entry_id.decode(), fields)

    def _admit_job(self, entry_id: str, fields: dict) -> None:
        self.last_job_read = entry_id
        try:
            job = decode_job(fields[b"job"])
        except (KeyError, msgspec.MsgspecError, BatchdError) as exc:
            log.error("dropping unreadable job %s: %s", entry_id, exc)
            self._ack_jobs([entry_id])
            return
        self.jobs_open[entry_id] = set()
        cancelled = self.redis.mget([self.keys.cancelled(r.id) for r in job.requests]) if job.requests else []
        now = self.clock()
        for request, cancel_flag in zip(job.requests, cancelled):
            self._admit(entry_id, request, now, cancelled=cancel_flag is not None)
        self._close_job_if_done(entry_id)

    def _admit(self, entry_id: str, request: Request, now: float, cancelled: bool) -> None:
        if request.id in self.tracked:
            return  # delivered twice (scheduler retry); already running here
        owner = scripts.owner_token(self.config.worker_id, request.attempt)
        tracked = _Tracked(request, entry_id, owner, now)
        try:
            if cancelled:
                raise Cancelled(f"request {request.id} was cancelled before it started", request.id)
            if request.deadline is not None and request.deadline <= now:
                raise DeadlineExceeded(f"request {request.id} expired before a slot was free; "
                                       "raise its timeout or add workers", request.id)
            prompt = self.engine.tokenize(request)
            self.engine.add(EngineRequest(request.id, prompt, request.params, request.deadline, now))
        except BatchdError as exc:
            reason = {"cancelled": "cancelled", "deadline_exceeded": "deadline"}.get(exc.code, "error")
            self._finish_now(tracked, error_result(request.id, exc, reason, request.submitted_at,
                                                   self.config.worker_id))
            return
        except Exception as exc:  # a bug or a tokenizer crash must cost one request, not the worker
            log.exception("could not admit request %s", request.id)
            self._finish_now(tracked, error_result(
                request.id, BatchdError(f"worker could not admit the request: {type(exc).__name__}: {exc}"),
                "error", request.submitted_at, self.config.worker_id))
            return
        self.tracked[request.id] = tracked
        self.jobs_open[entry_id].add(request.id)
        if request.attempt > 0:
            self._publish_step([(tracked, RestartEvent(attempt=request.attempt,
                                                        reason="resumed on worker " + self.config.worker_id))], [])
        metrics.queue_time.labels(*self._labels).observe(max(0.0, now - request.submitted_at))

    def _finish_now(self, tracked: _Tracked, result: Result) -> None:
        self._deliver([(tracked, result)])

    # -- cancellation -----------------------------------------------------------
    def _apply_cancels(self) -> None:
        while True:
            message = self._pubsub.get_message(timeout=0)
            if message is None:
                return
            if message["type"] != "message":
                continue
            request_id = message["data"].decode("utf-8", "replace")
            if request_id in self.tracked:
                self.engine.cancel(request_id, "cancelled")

    # -- stepping -------------------------------------------------------------
    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; handing its requests back")
            self._hand_back_all("engine failure on worker " + self.config.worker_id, count_attempt=True)
            return
        metrics.step_batch_size.labels(*self._labels).observe(self.engine.num_running + len(
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
                finished.append((tracked, self._result(tracked, output, now)))
        self._publish_step(events, finished)

    def _token_event(self, tracked: _Tracked, output: StepOutput, now: float) -> TokenEvent:
        index = len(tracked.token_ids)
        if output.new_token_ids:
            if tracked.first_token_at is None:
                tracked.first_token_at = now
                metrics.time_to_first_token.labels(*self._labels).observe(
                    max(0.0, now - tracked.request.submitted_at))
            elif tracked.last_token_at is not None:
                gap = (now - tracked.last_token_at) / len(output.new_token_ids)
                for _ in output.new_token_ids:
                    metrics.inter_token_latency.labels(*self._labels).observe(gap)
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

    def _publish_step(self, events: list, finished: list) -> None:
        """Token events in one round trip, then the final results."""
        if events:
            # One script call per lease token (requests of one attempt share it).
            by_owner: dict[str, list] = {}
            for tracked, event in events:
                by_owner.setdefault(tracked.owner, []).append((tracked, event))
            calls = []
            for token, group in by_owner.items():
                args = [token]
                for tracked, event in group:
                    args += [self.keys.channel(tracked.request.id), encode(event)]
                calls.append(("publish", [self.keys.owner(t.request.id) for t, _ in group], args))
            self._run_scripts(calls)
        if finished:
            self._deliver(finished)

    def _deliver(self, finished: list[tuple[_Tracked, Result]]) -> None:
        """Store and publish final results, then acknowledge the jobs they close."""
        calls = []
        for tracked, result in finished:
            keys, args = scripts.finalize_keys_args(self.keys, tracked.request.id, encode(FinalEvent(result)),
                                                    self.config.result_ttl_s, tracked.owner)
            calls.append(("finalize", keys, args))
        outcomes = self._run_scripts(calls)
        closed = []
        for (tracked, result), outcome in zip(finished, outcomes):
            self._count_finish(tracked, result, outcome)
            self.tracked.pop(tracked.request.id, None)
            open_ids = self.jobs_open.get(tracked.job_entry)
            if open_ids is not None:
                open_ids.discard(tracked.request.id)
                if not open_ids:
                    closed.append(tracked.job_entry)
        self._ack_jobs(closed)

    def _load_scripts(self) -> None:
        self._scripts = {name: self.redis.script_load(body) for name, body in SCRIPTS.items()}

    def _run_scripts(self, calls: list[tuple[str, list, list]]) -> list:
        """Run script calls in one pipeline; reload and rerun any Redis forgot (restart)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                pipe.evalsha(self._scripts[name], len(keys), *keys, *args)
            outcomes = pipe.execute(raise_on_error=False)
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
        return outcomes

    def _count_finish(self, tracked: _Tracked, result: Result, outcome) -> None:
        labels = self._labels
        if outcome == -1:
            metrics.results_fenced.labels(*labels).inc()
            log.warning("request %s now belongs to another worker; dropped this worker's result",
                        tracked.request.id)
            return
        metrics.requests_finished.labels(*labels, result.finish_reason).inc()
        if result.error is not None:
            metrics.request_errors.labels(*labels, result.error.type).inc()
        metrics.prompt_tokens.labels(*labels).inc(result.usage.prompt_tokens)
        metrics.generation_tokens.labels(*labels).inc(result.usage.completion_tokens)
        metrics.e2e_latency.labels(*labels).observe(result.timings.total_s)

    def _close_job_if_done(self, entry_id: str) -> None:
        if not self.jobs_open.get(entry_id):
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
    def _heartbeat(self, force: bool = False) -> None:
        now = self.clock()
        free = 0 if self._draining else self.engine.free_slots
        # Beat at once when slots free up, so schedulers refill them quickly.
        changed = free > self._last_free_slots and now >= self._next_heartbeat - self.config.heartbeat_interval_s + 0.02
        if not (force or changed or now >= self._next_heartbeat):
            return
        beat = Heartbeat(
            v=PROTOCOL_VERSION, worker_id=self.config.worker_id, model=self.engine.model_name,
            engine=self.engine.name, total_slots=self.engine.total_slots, free_slots=free,
            running=self.engine.num_running, waiting=self.engine.num_waiting,
            kv_cache_usage=self.engine.kv_cache_usage, last_job_read=self.last_job_read,
            lease_ms=self.config.lease_ms, host=socket.gethostname(), pid=os.getpid(),
            started_at=self.started_at, sent_at=now)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.heartbeat(self.config.worker_id), encode(beat), px=self.config.lease_ms)
            pipe.zadd(self.keys.workers, {self.config.worker_id: now})
            pipe.execute()
        self._last_free_slots = free
        self._next_heartbeat = now + self.config.heartbeat_interval_s
        metrics.heartbeats.labels(*self._labels).inc()
        metrics.requests_running.labels(*self._labels).set(self.engine.num_running)
        metrics.requests_waiting_in_engine.labels(*self._labels).set(self.engine.num_waiting)
        metrics.kv_cache_usage.labels(*self._labels).set(self.engine.kv_cache_usage)

    # -- shutdown ---------------------------------------------------------------
    def _drain(self) -> None:
        """Finish what is running for drain_timeout_s, then hand the rest back."""
        self._draining = True
        log.info("worker %s draining: %d requests in flight", self.config.worker_id, len(self.tracked))
        give_up = time.monotonic() + self.config.drain_timeout_s
        try:
            self._heartbeat(force=True)  # advertise no free slots
            while self.engine.has_work() and time.monotonic() < give_up:
                self._apply_cancels()
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
        log.info("worker %s stopped", self.config.worker_id)

    def _read_remaining_jobs(self) -> None:
        """Jobs dispatched to us that we never read go back too."""
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
                               count_attempt=False)
            self._ack_jobs([entry_id])

    def _hand_back_all(self, reason: str, count_attempt: bool) -> None:
        requests = [t.request for t in self.tracked.values()]
        for request_id in list(self.tracked):
            self.engine.cancel(request_id, "cancelled")
        if self.engine.has_work():
            self.engine.step()  # evicts the cancelled requests; their output is not sent
        recovery.hand_back(self.redis, self.keys, requests, reason, max_attempts=self.config.max_attempts,
                           result_ttl_s=self.config.result_ttl_s, count_attempt=count_attempt)
        self._ack_jobs(list(self.jobs_open))
        self.tracked.clear()
