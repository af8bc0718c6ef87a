"""What Client and AsyncClient share: building requests and reading events.

Both clients use one pattern subscription per client object for every request
id they mint (`<client_id>-<n>`), so a submit costs one round trip and the
subscription is in place before any request exists. A caller-chosen id gets
its own SUBSCRIBE first, so retrying a submit with the same id from a new
process still receives the result.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Sequence, Union

import msgspec

from .errors import BatchdError, InvalidRequest, error_from_code
from .connection import redis_url
from .keys import Keys
from .protocol import (
    PROTOCOL_VERSION,
    ChatMessage,
    FinalEvent,
    Request,
    RestartEvent,
    Result,
    SamplingParams,
    TokenEvent,
    decode_event,
    decode_request,
    encode,
)

# How long a finished result stays readable, and how long an id stays
# "accepted" so that a retried submit is recognised as a duplicate.
ACCEPTED_TTL_S = 24 * 3600
# Without any event for this long, a waiting caller reads the stored result,
# covering publishes lost while the pub/sub connection was down.
RESULT_POLL_S = 2.0
# Submits and cancels retry a lost connection this many times with exponential
# backoff (0.1 s doubling to 2 s, ~10 s in all), enough to ride out a Redis
# restart. Both are safe to repeat: a submit is idempotent by request id.
RECONNECT_RETRIES = 8
# A caller waits this long past a request's deadline for the worker's answer.
DEADLINE_GRACE_S = 10.0


@dataclass(frozen=True)
class Delta:
    """New text and token ids of a streaming request."""

    text: str
    token_ids: list[int]
    index: int


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
    """Request ids unique across processes: <client_id>-<counter>."""

    def __init__(self) -> None:
        self.client_id = uuid.uuid4().hex[:12]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self.client_id}-{next(self._counter)}"

    def owns(self, request_id: str) -> bool:
        return request_id.startswith(self.client_id + "-")


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
                ignore_eos=ignore_eos,
                contrast_alpha=None if contrast_alpha is None else float(contrast_alpha)),
            priority=priority,
            producer=producer,
            deadline=deadline,
            submitted_at=now,
            task=task,
            continuation=continuation,
            continuation_token_ids=list(continuation_token_ids) if continuation_token_ids is not None else None,
            top_logprobs=top_logprobs,
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

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.result: Result | None = None
        self._tokens: list[int] = []  # this attempt's output
        self._text: list[str] = []
        self._replaying = False  # after a restart, until the attempt caught up with what was shown
        self._shown_tokens: list[int] = []
        self._shown_text = ""
        self._restart: RestartEvent | None = None

    def parse(self, payload: bytes) -> StreamItem | None:
        try:
            event = decode_event(payload)
        except msgspec.MsgspecError:
            return None  # a newer worker's event kind: ignore rather than fail the call
        if isinstance(event, TokenEvent):
            self._tokens.extend(event.token_ids)
            self._text.append(event.text)
            if self._replaying:
                return self._replay()
            return Delta(text=event.text, token_ids=event.token_ids, index=event.index)
        if isinstance(event, RestartEvent):
            if not self._replaying:
                self._shown_tokens, self._shown_text = self._tokens, "".join(self._text)
            self._tokens, self._text = [], []
            self._replaying = True
            self._restart = event
            return None
        if isinstance(event, FinalEvent):
            self.result = event.result
            return event.result
        return None

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
        return Delta(text=new_text, token_ids=new_tokens, index=index) if new_tokens or new_text else None


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


__all__ = [
    "ACCEPTED_TTL_S", "BatchdError", "Delta", "EventParser", "IdMinter", "Keys", "RESULT_POLL_S",
    "StreamItem", "StreamRestarted", "build_request", "default_producer", "raise_for_error",
    "redis_url", "wait_budget",
]
