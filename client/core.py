"""The I/O-free core of Client and AsyncClient.

Both clients are thin transports around it: they own the connections and the
waiting; this module decides how a request is built, which commands and
arguments submitting and cancelling send, which request a pub/sub message
belongs to, how a handle reads its events and how long it waits, and how a lost
connection is retried. So the two cannot drift apart.

Both clients use one pattern subscription per client object for every request
id they mint (`<client_id>-<n>`), so a submit costs one round trip and the
subscription is in place before any request exists. A caller-chosen id gets
its own SUBSCRIBE first, so retrying a submit with the same id from a new
process still receives the result.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Generic, Iterator, Sequence, TypeVar, Union

import msgspec
import redis

from .connection import CONNECTION_LOST, Backoff
from .errors import BatchdError, BrokerUnavailable, InvalidRequest, Overloaded, ResultTimeout, WrongShards, error_from_code
from .keys import SHARED_TENANT_USERS, Keys, is_tenant, tenant_id, tenant_of, uses_shard_channels
from .protocol import (
    PROTOCOL_VERSION,
    ChatMessage,
    FinalEvent,
    Request,
    RestartEvent,
    Result,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    decode_event,
    decode_heartbeat,
    decode_request,
    encode,
    error_result,
    is_sealed,
    models_served,
)
from .scripts import ScriptCall, is_missing_function, submit_call

# Without any event for this long, a waiting caller reads the stored result,
# covering publishes lost while the pub/sub connection was down.
RESULT_POLL_S = 2.0
# Submits and cancels retry a lost connection this many times in all, waiting 0.1 s
# doubling to RECONNECT_BACKOFF_CAP_S in between (~10 s in all), enough to ride out a
# Redis restart. Both are safe to repeat: a submit is idempotent by request id. The
# pub/sub readers reconnect with the same backoff.
RECONNECT_RETRIES = 8
RECONNECT_BACKOFF_CAP_S = 2.0
# The waits above add up to this (plus each try's own connect timeout): then a caller gets
# BrokerUnavailable (docs/reliability.md).
RETRY_BUDGET_S = 7.1
# With durable_replicas, a submit (and a worker's stored results) waits this long for the
# replicas to acknowledge it (WAIT's timeout); fewer acknowledgements are retried like a
# NOREPLICAS refusal, within the retry budget. A replica on the same network acknowledges
# within a millisecond or two; this covers a replica that is catching up after a failover.
DURABLE_WAIT_MS = 1000
# A cancel flag outlives any request it can still stop.
CANCEL_TTL_S = 24 * 3600
# A caller waits this long past a request's deadline for the worker's answer.
DEADLINE_GRACE_S = 10.0


@dataclass(frozen=True)
class Delta:
    """New text and token ids of a streaming request."""

    text: str
    token_ids: list[int]
    index: int
    # With submit(logprobs=k): one entry per token of token_ids (protocol.TokenLogprob).
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class StreamRestarted:
    """The request was re-dispatched and decodes differently this time; the text starts over.

    A re-dispatched request whose output repeats what was already streamed
    (greedy or seeded decoding) continues seamlessly, without this item.
    """

    attempt: int
    reason: str


StreamItem = Union[Delta, StreamRestarted, Result]


class IdMinter:
    """Request ids unique across processes: [<tenant>/]<client_id>-<counter>."""

    def __init__(self, tenant: str = "") -> None:
        self.client_id = uuid.uuid4().hex[:12]
        self.id_prefix = tenant_id(tenant, self.client_id + "-")
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self.id_prefix}{next(self._counter)}"

    def owns(self, request_id: str) -> bool:
        return request_id.startswith(self.id_prefix)


def resolve_tenant(tenant: str | None, acl_user: str | None) -> str:
    """The tenant a client submits as: the one named, else its Redis ACL user; the
    unauthenticated (default) user submits to the shared stream ("")."""
    if tenant is None:
        tenant = "" if acl_user in (None, *SHARED_TENANT_USERS) else acl_user
    if tenant and not is_tenant(tenant):
        raise InvalidRequest(f"tenant {tenant!r} cannot name a request stream: use 1 to 64 characters of "
                             "[A-Za-z0-9._-] (pass tenant= when the Redis user name has others)")
    return tenant


def default_producer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def build_request(
    request_id: str,
    prompt: str | None,
    messages: Sequence[dict] | None,
    prompt_token_ids: Sequence[int] | None,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Sequence[str] | str | None,
    stop_token_ids: Sequence[int] | None,
    ignore_eos: bool,
    priority: int,
    producer: str,
    timeout: float | None,
    deadline: float | None,
    task: str = "generate",
    continuation: str | None = None,
    continuation_token_ids: Sequence[int] | None = None,
    top_logprobs: int | None = None,
    contrast_alpha: float | None = None,
    cancel_hash: str | None = None,
    event_key: str | None = None,
    model: str | None = None,
    logprobs_dtype: str = "float32",
    prefix_pin: str | None = None,
    rows: Sequence[Sequence[int]] | None = None,
    pin_ttl_s: int = 600,
    logprobs: int | None = None,
) -> tuple[Request, bytes]:
    """Build, encode and validate a request exactly as a scheduler will.

    Validating the encoded bytes with the daemons' own decoder means a bad
    argument fails here, at the call, with the same message.
    """
    now = time.time()
    for name, value in (("timeout", timeout), ("deadline", deadline)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
            raise InvalidRequest(f"{name} must be a number of seconds, got {value!r}", request_id)
    if timeout is not None:
        deadline = min(deadline, now + timeout) if deadline is not None else now + timeout
    if isinstance(stop, str):
        stop = [stop]
    try:
        request = Request(
            v=PROTOCOL_VERSION,
            id=request_id,
            prompt=prompt,
            messages=[ChatMessage(role=m["role"], content=m["content"]) for m in messages] if messages is not None else None,
            prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None,
            params=SamplingParams(
                max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                top_k=top_k, seed=seed, stop=list(stop or []), stop_token_ids=list(stop_token_ids or []),
                ignore_eos=ignore_eos, logprobs=logprobs,
                contrast_alpha=None if contrast_alpha is None else float(contrast_alpha)),
            priority=priority,
            producer=producer,
            deadline=deadline,
            submitted_at=now,
            task=task,
            continuation=continuation,
            continuation_token_ids=list(continuation_token_ids) if continuation_token_ids is not None else None,
            top_logprobs=top_logprobs,
            logprobs_dtype=logprobs_dtype,
            cancel_hash=cancel_hash,
            event_key=event_key,
            model=model or "",
            prefix_pin=prefix_pin,
            rows=[list(row) for row in rows] if rows is not None else None,
            pin_ttl_s=pin_ttl_s,
        )
        payload = encode(request)
    except (TypeError, KeyError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise InvalidRequest(f"invalid request arguments: {exc}", request_id) from None
    decode_request(payload, request_id)
    return request, payload


def wait_budget(timeout: float | None, deadline: float | None) -> float | None:
    """Seconds a caller waits for the final result, or None for no limit."""
    limits = []
    if timeout is not None:
        limits.append(timeout + DEADLINE_GRACE_S)
    if deadline is not None:
        limits.append(max(0.0, deadline - time.time()) + DEADLINE_GRACE_S)
    return min(limits) if limits else None


class EventParser:
    """Turns a request's wire events into stream items, final result last.

    When a request is re-dispatched after its worker died, the new attempt
    decodes from the start. While its output repeats what the caller was
    already shown (greedy or seeded decoding does), it is swallowed and the
    stream simply continues where it stopped; only if it differs does the
    caller get StreamRestarted, followed by the new attempt's text from the
    start.
    """

    def __init__(self, request_id: str, event_key: str | None = None):
        self.request_id = request_id
        self.result: Result | None = None
        self.event_key = event_key
        self._attempt = 0  # the attempt whose tokens are arriving
        self._tags_seen: set[bytes] = set()
        self._tokens: list[int] = []  # this attempt's output
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []  # with logprobs asked for: one per token
        self._replaying = False  # after a restart, until the attempt caught up with what was shown
        self._shown_tokens: list[int] = []
        self._shown_text = ""
        self._restart: RestartEvent | None = None

    def parse(self, payload: bytes) -> StreamItem | None:
        try:
            event = decode_event(payload)
        except msgspec.MsgspecError:
            return None  # a newer worker's event kind: ignore rather than fail the call
        if isinstance(event, (TokenEvent, RestartEvent)) and not self._authentic(event):
            return None  # forged or replayed by someone allowed to PUBLISH (docs/security.md)
        if isinstance(event, TokenEvent):
            self._tokens.extend(event.token_ids)
            self._text.append(event.text)
            self._logprobs.extend(event.logprobs or ())
            if self._replaying:
                return self._replay()
            return Delta(text=event.text, token_ids=event.token_ids, index=event.index, logprobs=event.logprobs)
        if isinstance(event, RestartEvent):
            if not self._replaying:
                self._shown_tokens, self._shown_text = self._tokens, "".join(self._text)
            self._tokens, self._text, self._logprobs = [], [], []
            self._replaying = True
            self._restart = event
            self._attempt = event.attempt
            return None
        if isinstance(event, FinalEvent):
            self.result = self._own(event.result)
            return self.result
        return None

    def sealed_final(self, payload: bytes) -> Result | None:
        """The result of a payload that is a final event the fleet sealed for this request, else None."""
        try:
            event = decode_event(payload)
        except msgspec.MsgspecError:
            return None
        if isinstance(event, FinalEvent) and self.event_key is not None \
                and is_sealed(event.result, self.event_key, self.request_id, "final"):
            return event.result
        return None

    def _own(self, result: Result) -> Result:
        """The stored result, if the fleet sealed it for this client's request; else the id was
        taken by another submission before ours (only the first runs), and that one's outcome
        is not ours to return."""
        if self.event_key is None or is_sealed(result, self.event_key, self.request_id, "final"):
            return result
        return error_result(self.request_id, InvalidRequest(
            f"request id {self.request_id} was taken by another submission before this one, and its result "
            "is that one's: submit with a fresh id (the default), or give the processes that retry each "
            "other's ids the same cancel_key", self.request_id))

    def _authentic(self, event: TokenEvent | RestartEvent) -> bool:
        """With an event_key, only events the fleet sealed for this request and attempt count,
        each once, and no token event from before the tokens already taken (a replay)."""
        if self.event_key is None:
            return True
        if isinstance(event, TokenEvent):
            attempt = self._attempt
            if event.index < len(self._tokens):
                return False
        else:
            attempt = event.attempt
            if attempt < self._attempt:
                return False
        if event.tag in self._tags_seen or not is_sealed(event, self.event_key, self.request_id, attempt):
            return False
        self._tags_seen.add(event.tag)
        return True

    def _replay(self) -> StreamItem | None:
        tokens, text = self._tokens, "".join(self._text)
        shown_tokens, shown_text = self._shown_tokens, self._shown_text
        if not (_agree(tokens, shown_tokens) and _agree(text, shown_text)):
            # The new attempt decodes differently: the caller's text starts over.
            self._shown_tokens, self._shown_text = [], ""
            restart = self._restart or RestartEvent(attempt=0)
            return StreamRestarted(attempt=restart.attempt, reason=restart.reason)
        index = len(shown_tokens)
        new_tokens, new_text = tokens[index:], text[len(shown_text):]
        self._shown_tokens = shown_tokens + new_tokens
        self._shown_text = shown_text + new_text
        if len(tokens) == len(self._shown_tokens) and len(text) == len(self._shown_text):
            self._replaying = False  # caught up: from here on events pass straight through
        logprobs = self._logprobs[index:len(tokens)] if self._logprobs else None
        return (Delta(text=new_text, token_ids=new_tokens, index=index, logprobs=logprobs)
                if new_tokens or new_text else None)


def served_models(heartbeats: Sequence[bytes | None]) -> list[str]:
    """The model names the live workers' heartbeats advertise, sorted; unreadable ones are skipped."""
    names: set[str] = set()
    for raw in heartbeats:
        if raw is None:
            continue
        try:
            names.update(models_served(decode_heartbeat(raw)))
        except (msgspec.MsgspecError, BatchdError):
            continue  # a newer or broken worker's beat: it serves nothing this client can name
    return sorted(names)


def _agree(a, b) -> bool:
    """One sequence is a prefix of the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def raise_for_error(result: Result) -> Result:
    """Return a successful (or partial) result; raise the typed error otherwise."""
    if result.error is not None:
        raise error_from_code(result.error.type, result.error.message, result.request_id)
    return result


def overloaded_message(stream: str) -> str:
    return (f"batchd queue {stream} is full (max_queue reached); back off and retry, "
            "or add workers")


# Replies that mean "not now" rather than "never": a long script is running (BUSY), a key
# batchd needs has the wrong type until a scheduler rewrites it (WRONGTYPE), no scheduler
# has loaded the SUBMIT function yet, a replica or cluster is failing over (MASTERDOWN,
# LOADING, TRYAGAIN; READONLY from a master demoted under a plain URL; NOREPLICAS from a
# master with min-replicas-to-write whose replicas are reconnecting), the request stream's
# last id was set to the largest (a scheduler sets it back), a cluster slot moved under a
# durable write sent to its master directly (MOVED, ASK). Retried like a lost connection.
TRANSIENT_REPLIES = ("busy", "wrongtype", "function not found", "tryagain", "masterdown", "loading",
                     "noreplicas", "readonly", "the stream has exhausted", "moved ", "ask ")


# What a cluster client raises while slots move or a master fails over: the cluster is down
# until a replica is promoted, a script's keys are split mid-migration (TRYAGAIN, and redis-py's
# "TTL exhausted" once its own quick retries ran out), a slot moved under a write sent to its
# old master directly (MOVED, ASK: durable writes, connection.master_client).
CLUSTER_MOVING = (redis.exceptions.ClusterDownError, redis.exceptions.ClusterError,
                  redis.exceptions.TryAgainError, redis.exceptions.MasterDownError,
                  redis.exceptions.MovedError, redis.exceptions.AskError)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed Redis command is worth trying again within the retry budget."""
    if isinstance(exc, (*CONNECTION_LOST, redis.exceptions.ReadOnlyError, *CLUSTER_MOVING)):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).lower().startswith(TRANSIENT_REPLIES) \
        or is_missing_function(exc)


def not_durable(acknowledged: int, wanted: int, what: str) -> redis.ResponseError:
    """A write the master took but fewer than `wanted` replicas acknowledged: the master's own
    NOREPLICAS refusal (min-replicas-to-write) says the same, and it is retried the same way."""
    return redis.ResponseError(f"NOREPLICAS {what}: {acknowledged} of {wanted} replicas acknowledged it "
                               f"within {DURABLE_WAIT_MS} ms")


def durable_outcomes(outcomes: Sequence, acknowledged: Any, wanted: int, what: str) -> list:
    """The outcomes of a pipeline of SUBMITs followed by WAIT: raise what must be retried (a
    transient error, a missing function: its rerun would go out on another connection, which
    WAIT does not cover) or a WAIT short of `wanted` replicas when anything was enqueued."""
    for outcome in (*outcomes, acknowledged):
        if isinstance(outcome, redis.RedisError) and is_transient(outcome):
            raise outcome
    if isinstance(acknowledged, redis.RedisError):
        raise acknowledged  # say, this user may not run WAIT (docs/security.md)
    if any(outcome == 1 for outcome in outcomes) and acknowledged < wanted:
        raise not_durable(acknowledged, wanted, what)
    return list(outcomes)


def unavailable(exc: BaseException, what: str) -> BrokerUnavailable:
    """The typed error a caller sees once a command failed for good (or for the whole budget)."""
    hint = ""
    if str(exc).startswith("NOREPLICAS"):
        hint = (" (with durable_replicas the request may be queued but is not known to survive a failover; "
                "submitting the same request_id again is safe)")
    elif is_missing_function(exc):
        hint = " (no scheduler has loaded batchd's functions into this Redis yet: start a scheduler)"
    elif isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc):
        hint = " (this Redis user lacks a permission docs/security.md grants producers)"
    elif isinstance(exc, CONNECTION_LOST):
        hint = f" (tried for about {RETRY_BUDGET_S:.0f} s; check the Redis URL and that Redis is up)"
    return BrokerUnavailable(f"{what} failed: {type(exc).__name__}: {exc}{hint}")


def retry_delays() -> Iterator[float]:
    """The waits between the tries of an idempotent command whose connection was lost."""
    backoff = reconnect_backoff()
    for _ in range(RECONNECT_RETRIES - 1):
        yield backoff.next_delay()


def reconnect_backoff() -> Backoff:
    return Backoff(cap_s=RECONNECT_BACKOFF_CAP_S)


class CancelSecrets:
    """Each request's cancel secret, derived from one per-client key: a request carries the hash
    (cancel_hash) and only a caller holding the key can cancel it. Clients given the same
    cancel_key (say, a service's processes) can cancel each other's requests by id."""

    def __init__(self, key: str | bytes | None):
        key = key if key is not None else secrets.token_hex(16)
        self._key = key.encode() if isinstance(key, str) else key

    def secret(self, request_id: str) -> str:
        return hmac.new(self._key, request_id.encode(), hashlib.sha256).hexdigest()[:32]

    def hash(self, request_id: str) -> str:
        return hashlib.sha1(self.secret(request_id).encode()).hexdigest()

    def event_key(self, request_id: str) -> str:
        """The key the fleet tags this request's token events with (protocol.seal_event)."""
        return hmac.new(self._key, b"events\0" + request_id.encode(), hashlib.sha256).hexdigest()[:32]


def queue_cancel(pipe: Any, keys: Keys, request_id: str, secret: str) -> None:
    """Cancel a request: its flag first (a scheduler checks it at dispatch, a worker on a gap in
    its subscription), then the broadcast that frees a running slot at once. Both carry the
    request's cancel secret; a request whose cancel_hash it does not match ignores them."""
    pipe.set(keys.cancelled(request_id), secret, ex=CANCEL_TTL_S)
    pipe.publish(keys.cancel_channel, f"{request_id} {secret}")


class _EventKind(msgspec.Struct):
    type: str = ""


_event_kind = msgspec.msgpack.Decoder(_EventKind)


def is_final_event(payload: bytes) -> bool:
    """Whether a pub/sub payload claims to be a final event. A claim is taken as the result only
    with this request's seal (Reading.triage): anyone allowed to subscribe may publish on a
    request's channel; otherwise the handle reads the stored result (result:<id>, which
    producers cannot write) instead."""
    try:
        return _event_kind.decode(payload).type == "final"
    except (msgspec.MsgspecError, ValueError):
        return False


# A shard channel's subscription is waited for in this many rounds of its 10 s; each round
# that ends unconfirmed renews the sharded subscription (Client's and AsyncClient's readers).
SHARD_SUBSCRIBE_ROUNDS = 5


# A shard-channel change: (True, channel) subscribes, (False, channel) unsubscribes.
ShardChange = tuple[bool, str]


class ShardChanges:
    """Shard-channel (un)subscriptions held back because their master could not be reached
    (killed, not yet replaced), tried again after a back-off while the others go out.

    Each shard channel lives on the master of its slot. Before, a change whose master was dead
    stayed at the head of the queue, and every later request's subscription, on healthy
    masters too, waited behind it until its submit was refused (10 s); the sync Client's
    reader also stopped reading events for its back-off. Both clients' readers run a pass:

        sending = changes.begin(now, queued, node_of)
        for subscribe, channel in sending:
            try: (ssubscribe if subscribe else sunsubscribe)(channel)
            except RedisError as exc: sending.fail(exc)
        if changes.end(sending, now) is not None: ask the cluster for its slot table anew
    """

    def __init__(self) -> None:
        self._held_back: list[tuple[float, ShardChange]] = []
        self._delay = reconnect_backoff()

    def __bool__(self) -> bool:
        return bool(self._held_back)

    def held_back(self) -> set[str]:
        return {channel for _, (_, channel) in self._held_back}

    def begin(self, now: float, queued: Sequence[ShardChange], node_of) -> ShardPass:
        """The changes to send now, in order: the held-back ones that are due, then the queued.
        An unsubscription whose subscription never went out cancels it: the request is gone."""
        due = [change for at, change in self._held_back if at <= now]
        self._held_back = [(at, change) for at, change in self._held_back if at > now]
        changes: list[ShardChange] = []
        for change in [*due, *queued]:
            subscribe, channel = change
            if not subscribe and (True, channel) in changes:
                changes.remove((True, channel))
            elif not subscribe and any(held == (True, channel) for _, held in self._held_back):
                self._held_back = [(at, held) for at, held in self._held_back if held != (True, channel)]
            else:
                changes.append(change)
        return ShardPass(changes, node_of, retried=bool(due))

    def end(self, sent: ShardPass, now: float) -> BaseException | None:
        """Hold back what failed, all to be tried at one time after the back-off; returns the
        failure (the caller relearns the slot table: a dead master's slots go to its successor)."""
        if not sent.failed:
            if sent.retried:
                self._delay.reset()
            return None
        retry_at = now + self._delay.next_delay()
        self._held_back += [(retry_at, change) for change in sent.failed]
        return sent.failure


class ShardPass:
    """One pass over shard-channel changes (ShardChanges.begin): iterating gives the changes to
    send; a change whose master failed earlier in the pass is not tried again in it (a dead
    host may take seconds to refuse), it is held back with the one that failed."""

    def __init__(self, changes: list[ShardChange], node_of, retried: bool):
        self.changes, self.retried = changes, retried
        self.failed: list[ShardChange] = []
        self.failure: BaseException | None = None
        self._node_of = node_of
        self._unreachable: set = set()
        self._current: tuple[ShardChange, Any] | None = None

    def __iter__(self) -> Iterator[ShardChange]:
        for change in self.changes:
            node = self._node_of(change[1])
            if node in self._unreachable:
                self.failed.append(change)
                continue
            self._current = (change, node)
            yield change

    def fail(self, exc: BaseException) -> None:
        """The change just given could not be sent."""
        change, node = self._current
        self.failed.append(change)
        self.failure = exc
        self._unreachable.add(node)


class Routes:
    """Which request each pub/sub message belongs to."""

    def __init__(self, keys: Keys):
        self._keys = keys

    def request_of(self, message: dict) -> str | None:
        """The request id of an event message; None for anything else."""
        if message["type"] not in ("message", "pmessage", "smessage"):
            return None
        return self._keys.request_of_channel(_text(message["channel"]))

    def still_wanted(self, channels, handles: dict, confirmations: dict) -> set[str]:
        """Of a subscription's channels, those whose request is still read (or whose
        subscription someone still waits for): what a fresh subscription must carry."""
        texts = {_text(channel) for channel in channels}
        return {c for c in texts if c in confirmations or self._keys.request_of_channel(c) in handles}

    @staticmethod
    def confirmed(message: dict) -> str | None:
        """The channel a (S)SUBSCRIBE confirmation is for; None for anything else (ask request_of
        first: nearly every message is an event)."""
        return _text(message["channel"]) if message["type"] in ("subscribe", "ssubscribe") else None

    def route(self, message: dict, handles: dict, confirmations: dict) -> Any:
        """Hand an event to its request's handle; for a SUBSCRIBE confirmation, return (and forget)
        the waiter registered for its channel, for the transport to wake."""
        request_id = self.request_of(message)
        if request_id is not None:
            handle = handles.get(request_id)
            if handle is not None:
                handle._deliver(message["data"])
            return None
        channel = self.confirmed(message)
        waiter = confirmations.pop(channel, None)
        if waiter is None and channel is not None:
            # Nobody asked: the subscription was made again (a reconnect, or a shard channel
            # moved to its slot's new master), and what was published meanwhile is lost.
            handle = handles.get(self._keys.request_of_channel(channel) or "")
            if handle is not None:
                handle._deliver(RECHECK)
        return waiter


def _text(channel: str | bytes) -> str:
    return channel.decode() if isinstance(channel, bytes) else channel


# Reading.triage's answers.
TAKE, IGNORE, STORED = "take", "ignore", "stored"

# Delivered to every waiting handle after the pub/sub connection came back:
# events published meanwhile are lost, so the handle reads its stored result now.
RECHECK: bytes = object()  # type: ignore[assignment]


def recheck_after_reconnect(subscription: Any, handles: dict) -> None:
    """After the subscription (connection.Subscription) reconnected, every waiting handle
    reads its stored result at once instead of at its next poll."""
    subscription.reconnected = False
    for handle in list(handles.values()):
        handle._deliver(RECHECK)


class Reading:
    """How a handle reads one request: wire events in, stream items out, the final Result
    last (raising its typed error), and how long to wait for the next event before looking
    for a stored result."""

    def __init__(self, request_id: str, wait_s: float | None, event_key: str | None = None,
                 expects_vector: bool = False):
        self.request_id = request_id
        self._parser = EventParser(request_id, event_key)
        # A full next-token vector is published without the vector (a sealed cue, workers/outbox.py):
        # the caller reads the stored result for it.
        self._expects_vector = expects_vector
        self._wait_s = wait_s
        self._give_up: float | None = None

    def begin(self) -> None:
        """The caller starts waiting: its wait budget counts from now."""
        self._give_up = time.monotonic() + self._wait_s if self._wait_s is not None else None

    @property
    def done(self) -> bool:
        return self._parser.result is not None

    def next_wait_s(self) -> float:
        """Seconds to wait for the next event before reading the stored result;
        raises ResultTimeout once the caller's budget is spent."""
        if self._give_up is None:
            return RESULT_POLL_S
        wait = min(RESULT_POLL_S, self._give_up - time.monotonic())
        if wait <= 0:
            raise ResultTimeout(f"no result for request {self.request_id} in time; it may still run "
                                "(raise timeout, or check that workers are live with `batchd status`)",
                                self.request_id)
        return wait

    def triage(self, payload: bytes) -> str:
        """What a handle does with one pub/sub payload: TAKE it (an event; a final event sealed
        for this request: the fleet's), IGNORE it (a final event without this request's seal:
        anyone may publish one, and reading the stored result on its cue would skip the tokens
        still queued behind it), or read the STORED result (after a reconnect, or a final event
        of a request that carries no event_key: the stored result is the one producers cannot
        write)."""
        if payload is RECHECK:
            return STORED
        if not is_final_event(payload):
            return TAKE
        if self._parser.event_key is None:
            return STORED
        sealed = self._parser.sealed_final(payload)
        if sealed is None:
            return IGNORE
        return STORED if self._expects_vector and sealed.logprobs is None and sealed.error is None else TAKE

    def take(self, payload: bytes) -> StreamItem | None:
        """The stream item of one event (None: nothing to show); a failed final result raises."""
        item = self._parser.parse(payload)
        return raise_for_error(item) if isinstance(item, Result) else item


Sent = TypeVar("Sent")


def default_shards() -> int:
    """The fleet's request shards when a caller names none: $BATCHD_SHARDS, else 1."""
    text = os.environ.get("BATCHD_SHARDS", "").strip()
    try:
        return int(text) if text else 1
    except ValueError:
        raise InvalidRequest(f"BATCHD_SHARDS must be a number of shards, got {text!r}") from None


def check_fleet_shards(found: bytes | str | None, mine: int, who: str = "this client") -> None:
    """Raise WrongShards when the fleet's schedulers published another shard count than
    `mine` (found: the `shards` field of Keys.fleet_config; None before any scheduler ran,
    which a producer started first must accept)."""
    if found is None:
        return
    try:
        fleet = int(found)
    except ValueError:  # not a scheduler's writing: schedulers rewrite it within a second
        return
    if fleet != mine:
        setting = "shards=" if who == "this client" else "--shards "
        raise WrongShards(f"the fleet's schedulers split requests into {fleet} shard(s) but {who} uses {mine}: "
                          f"its requests would go to streams no scheduler reads; use {setting}{fleet} "
                          f"(or BATCHD_SHARDS={fleet}) here, or restart the fleet with {mine} (docs/deploy.md)")


class ClientCore(Generic[Sent]):
    """The producer API both clients offer, built on the transport's _send (the handle for
    Client, an awaitable of it for AsyncClient)."""

    def __init__(self, prefix: str, producer: str | None, cancel_key: str | bytes | None = None,
                 durable_replicas: int = 0, tenant: str = "", shards: int | None = None, cluster: bool = False):
        """cluster: the client speaks to Redis Cluster (then a fleet of several shards publishes
        on shard channels, Keys.shard_channels)."""
        if isinstance(durable_replicas, bool) or not isinstance(durable_replicas, int) or durable_replicas < 0:
            raise InvalidRequest(f"durable_replicas must be a whole number of replicas, 0 or more, "
                                 f"got {durable_replicas!r}")
        # A submit counts as accepted only once this many replicas hold it (WAIT): with
        # appendfsync always on them, a failover then cannot lose it (docs/reliability.md).
        self.durable_replicas = durable_replicas
        shards = default_shards() if shards is None else shards
        self.keys = Keys(prefix, shards, shard_channels=uses_shard_channels(cluster, shards))
        self.producer = producer or default_producer()
        # Which request stream this client submits to, and the namespace of its request ids.
        self.tenant = tenant
        self._cancel_secrets = CancelSecrets(cancel_key)
        self._ids = IdMinter(tenant)
        self._routes = Routes(self.keys)

    def submit(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] | str | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False, contrast_alpha: float | None = None, priority: int = 0,
               timeout: float | None = None, deadline: float | None = None,
               request_id: str | None = None, model: str | None = None, logprobs: int | None = None,
               prefix_pin: str | None = None) -> Sent:
        """Enqueue one request and return its handle at once (AsyncClient: await it).

        model names the model to answer with, as workers advertise it (`models()`); None:
        the fleet's only model. logprobs=k: each generated token's log-probability and its k most
        likely alternatives, in the stream's Deltas and the Result's generated_logprobs.
        prefix_pin: a pin's handle (pin()): the prompt is its tokens, then prompt_token_ids. Raises InvalidRequest for bad arguments (at the call, before
        anything is sent) and Overloaded when the queue is full; a model no live worker
        serves comes back as UnknownModel. Submitting again with the same request_id never
        runs it twice.
        """
        explicit = request_id is not None
        if isinstance(request_id, str):
            request_id = self.own_id(request_id)
        if not explicit:
            request_id = self._ids.next()
        request, payload = build_request(
            request_id, prompt, messages, prompt_token_ids, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, contrast_alpha=contrast_alpha,
            priority=priority, producer=self.producer, timeout=timeout, deadline=deadline, model=model,
            logprobs=logprobs, prefix_pin=prefix_pin, **self._secrets(request_id))
        return self._send(request, payload, explicit, timeout)

    def own_id(self, request_id: str) -> str:
        """A caller's id in this client's namespace (`<tenant>/<id>`), as submit, cancel and
        fetch_result take it; an id in another tenant's namespace cannot be submitted here."""
        full = tenant_id(self.tenant, request_id)
        if tenant_of(full) != self.tenant:
            where = f"ids of tenant {self.tenant!r} start with '{self.tenant}/'" if self.tenant else \
                "a client without a tenant submits ids without '/'"
            raise InvalidRequest(f"request id {request_id!r} is outside this client's namespace: {where}", request_id)
        return full

    def _secrets(self, request_id: Any) -> dict:
        """A request's cancel_hash and event_key (build_request's arguments): every request a
        client makes carries both, scoring included (docs/security.md)."""
        if not isinstance(request_id, str):
            return {"cancel_hash": None, "event_key": None}
        return {"cancel_hash": self._cancel_secrets.hash(request_id),
                "event_key": self._cancel_secrets.event_key(request_id)}

    def _send(self, request: Request, payload: bytes, explicit: bool, timeout: float | None) -> Sent:
        raise NotImplementedError

    def _reading(self, request: Request, timeout: float | None) -> Reading:
        return Reading(request.id, wait_budget(timeout, request.deadline), request.event_key,
                       expects_vector=request.task == "next_token_logprobs" and request.top_logprobs is None)

    def _submit_call(self, request: Request, payload: bytes) -> ScriptCall:
        return submit_call(self.keys, self.tenant, request.id, payload)

    def _needs_own_subscription(self, request_id: str, explicit: bool) -> bool:
        """A caller-chosen id outside this client's pattern subscription, or any id where there is
        no pattern subscription (shard channels)."""
        return self.keys.shard_channels or explicit and not self._ids.owns(request_id)

    def _overloaded(self, request_id: str) -> Overloaded:
        return Overloaded(overloaded_message(self.keys.requests_of(self.tenant)), request_id)


__all__ = ["ClientCore", "Delta", "EventParser", "Reading", "Routes", "StreamItem", "StreamRestarted", "build_request"]
