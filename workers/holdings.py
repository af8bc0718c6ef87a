"""What a worker holds and what it can take: pure bookkeeping, no I/O and no engine.

The worker loop (worker.py) tells it what happened (a job read, a request
admitted, tokens produced, a result delivered) and asks what follows: which
result closes which job, what a finished request's Result is, whether a caller
stopped listening, how many requests the worker can take, and whether the
schedulers need a fresh heartbeat. Tests drive all of it without Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchd.client.keys import format_last_reads, parse_job_ref
from batchd.client.protocol import ErrorInfo, Heartbeat, Request, Result, Timings, TokenEvent, TokenLogprob, Usage
from batchd.daemon.toolkit import SERVER_TICK_MS

from .engine import ScoreItem, ScoreOutput, StepOutput

# The longest an idle worker blocks on its job streams: how long a SIGTERM (a rolling deploy,
# `batchd up` stopping, a test's teardown) may wait for the read to return. Waiting until the
# next beat (--heartbeat-interval, 1 s by default) made an idle worker take 0.8 s to stop on
# average; four empty reads a second cost Redis nothing.
IDLE_READ_MAX_MS = 250

# While busy, a heartbeat that only reports changed free slots waits at least this long
# after the last one, so a busy worker does not beat at every step.
CHANGED_BEAT_GAP_S = 0.02


# numpy's names of the wire encodings of a full vector (little-endian).
_WIRE_DTYPES = {"float32": "<f4", "float16": "<f2"}


@dataclass
class Held:
    """A request this worker holds: where it came from and what it produced so far."""

    request: Request
    job_entry: str
    owner: str  # the lease token its events are published under
    admitted_at: float
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Since when no subscriber received this request's token events.
    unheard_since: float | None = None
    # A scoring request the engine runs in its steps: what it asked.
    score_item: ScoreItem | None = None
    # With SamplingParams.logprobs: each generated token's.
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def shard(self) -> int:
        """Its request's shard: that of the job it came in (a job carries one shard's requests)."""
        return parse_job_ref(self.job_entry)[0]

    def add_tokens(self, token_ids: list[int], text: str, now: float,
                   logprobs: list[TokenLogprob] | None = None) -> TokenEvent:
        """Record one step's new tokens and text (and their logprobs); the event that streams them."""
        index = len(self.token_ids)
        if token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        self.token_ids.extend(token_ids)
        self.text.append(text)
        if logprobs:
            self.logprobs.extend(logprobs)
        return TokenEvent(index=index, token_ids=token_ids, text=text, logprobs=logprobs or None)

    def unheard_for(self, listeners: int, now: float, abandoned_after_s: float) -> float | None:
        """Note how many subscribers received this request's latest tokens. Returns the seconds
        nobody has once that reaches abandoned_after_s (its caller is gone: the protocol has
        callers subscribe before they submit), and again each abandoned_after_s after; else None."""
        if listeners != 0:
            self.unheard_since = None
        elif self.unheard_since is None:
            self.unheard_since = now
        elif now - self.unheard_since >= abandoned_after_s:
            silent, self.unheard_since = now - self.unheard_since, now
            return silent
        return None

    def result(self, output: StepOutput, now: float, worker_id: str) -> Result:
        """The final Result of a generate request that the engine just finished."""
        submitted = self._submitted_at()
        error = None if output.error is None else ErrorInfo(type=output.error.code, message=output.error.message)
        return Result(
            request_id=self.request.id,
            finish_reason=output.finish_reason,
            text="".join(self.text),
            token_ids=list(self.token_ids),
            usage=Usage(prompt_tokens=output.prompt_tokens, completion_tokens=len(self.token_ids)),
            timings=Timings(
                queued_s=max(0.0, self.admitted_at - submitted),
                first_token_s=None if self.first_token_at is None else max(0.0, self.first_token_at - submitted),
                total_s=max(0.0, now - submitted)),
            error=error,
            worker=worker_id,
            attempt=self.request.attempt,
            generated_logprobs=list(self.logprobs) if self.request.params.logprobs is not None else None)

    def score_result(self, item: ScoreItem, output: ScoreOutput, now: float, worker_id: str) -> Result:
        """The final Result of a scoring request."""
        submitted = self._submitted_at()
        vector = output.next_token_logprobs
        dtype = self.request.logprobs_dtype
        return Result(
            request_id=self.request.id,
            finish_reason="stop",
            usage=Usage(prompt_tokens=len(item.prompt_token_ids) + len(item.continuation_token_ids or ())),
            timings=Timings(queued_s=max(0.0, self.admitted_at - submitted), total_s=max(0.0, now - submitted)),
            worker=worker_id,
            attempt=self.request.attempt,
            logprobs=None if vector is None else vector.numpy().astype(_WIRE_DTYPES[dtype]).tobytes(),
            logprobs_dtype=dtype,
            top_token_ids=output.top_token_ids,
            top_logprobs=output.top_logprobs,
            token_logprobs=output.token_logprobs,
            total_logprob=output.total_logprob)

    def _submitted_at(self) -> float:
        return self.request.submitted_at or self.admitted_at


class Holdings:
    """The requests a worker holds and the jobs they came in.

    A job stays open until every one of its requests has a delivered outcome,
    refusals included, so a connection lost mid-admission never leaves a job that
    looks finished.
    """

    def __init__(self) -> None:
        self.requests: dict[str, Held] = {}
        # Job stream entry id -> the ids of its requests without a delivered outcome.
        self.jobs_open: dict[str, set[str]] = {}
        # The newest job entry read on each shard's stream; schedulers count jobs after it as
        # not yet seen.
        self._last_read: dict[int, str] = {}
        self.last_job_read = "0-0"

    def note_read(self, job: str) -> None:
        """A job (keys.job_ref) was read."""
        shard, entry_id = parse_job_ref(job)
        self._last_read[shard] = entry_id
        self.last_job_read = format_last_reads(self._last_read)

    def is_open(self, entry_id: str) -> bool:
        return entry_id in self.jobs_open

    def open_job(self, entry_id: str, request_ids: list[str]) -> None:
        self.jobs_open[entry_id] = set(request_ids)

    def hold(self, held: Held) -> None:
        self.requests[held.request.id] = held

    def job_is_done(self, entry_id: str) -> bool:
        """Open, with nothing left to deliver (every request a duplicate of one held already)."""
        return entry_id in self.jobs_open and not self.jobs_open[entry_id]

    def jobs_closed_by(self, finished: list[tuple[Held, Result]]) -> dict[str, Held]:
        """The jobs these results complete, each with the request whose result completes it."""
        left: dict[str, set[str]] = {}
        closing = {}
        for held, _result in finished:
            open_ids = self.jobs_open.get(held.job_entry)
            if open_ids is None or held.request.id not in open_ids:
                continue
            remaining = left.setdefault(held.job_entry, set(open_ids))
            remaining.discard(held.request.id)
            if not remaining:
                closing[held.job_entry] = held
        return closing

    def delivered(self, held: Held) -> None:
        """Its outcome is stored: it is no longer held, and a job it completed is closed."""
        self.requests.pop(held.request.id, None)
        open_ids = self.jobs_open.get(held.job_entry)
        if open_ids is not None and held.request.id in open_ids:
            open_ids.discard(held.request.id)
            if not open_ids:
                del self.jobs_open[held.job_entry]

    def jobs_acked(self, entry_ids: list[str]) -> None:
        for entry_id in entry_ids:
            self.jobs_open.pop(entry_id, None)

    def forget_all(self) -> None:
        self.requests.clear()
        self.jobs_open.clear()


def free_slots(total_slots: int, running: int, waiting: int) -> int:
    """Engine slots no request holds or waits for: what an operator reads as free."""
    return max(0, total_slots - running - waiting)


def can_take(total_slots: int, prefetch: int | None, running: int, waiting: int) -> int:
    """Requests a worker can take now: free slots plus room in its prefetch queue (None: half the slots)."""
    room = prefetch if prefetch is not None else max(1, total_slots // 2)
    return max(0, total_slots + room - running - waiting)


@dataclass
class Advertisement:
    """What the schedulers were last told in a heartbeat, and when they must hear again.

    A beat goes out every interval_s, and as soon as it would say something new:
    another number of requests it can take, or jobs read that schedulers still count as queued
    (last_job_read). While the engine is busy such a beat waits CHANGED_BEAT_GAP_S
    after the last; an idle worker beats at once, or the next job would wait for it.
    """

    interval_s: float
    can_take: int = -1
    last_job_read: str = "0-0"
    next_beat_at: float = 0.0

    def is_stale(self, can_take: int, last_job_read: str) -> bool:
        return can_take != self.can_take or last_job_read != self.last_job_read

    def is_due(self, now: float, can_take: int, last_job_read: str, busy: bool) -> bool:
        changed = self.is_stale(can_take, last_job_read) and (not busy or now >= self._changed_beat_at())
        return changed or now >= self.next_beat_at

    def idle_wait_ms(self, now: float, can_take: int, last_job_read: str) -> int:
        """How long an idle worker may wait for jobs before a beat is due."""
        if self.is_stale(can_take, last_job_read):
            return max(1, int((self._changed_beat_at() - now) * 1000))
        # Nothing to advertise: wait until the periodic beat, at most IDLE_READ_MAX_MS. A new
        # job wakes the read at once, so a long wait costs no latency, and a short one would be
        # a busy poll; but a blocked read cannot be interrupted, and SIGTERM waits for it.
        return min(IDLE_READ_MAX_MS, max(SERVER_TICK_MS, int((self.next_beat_at - now) * 1000)))

    def sent(self, beat: Heartbeat) -> None:
        self.can_take = beat.requests_it_can_take()
        self.last_job_read = beat.last_job_read
        self.next_beat_at = beat.sent_at + self.interval_s

    def _changed_beat_at(self) -> float:
        return self.next_beat_at - self.interval_s + CHANGED_BEAT_GAP_S
