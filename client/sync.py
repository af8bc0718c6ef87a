"""Client: the blocking producer API, safe to share between threads.

One Client holds one connection pool for commands and one pub/sub connection,
read by a single background thread that routes each event to the request it
belongs to; thousands of concurrent requests share both.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator, Sequence

import redis

from .errors import Overloaded, ResultTimeout
from .keys import Keys
from .protocol import Request, Result
from . import scoring, scripts
from ._common import (
    ACCEPTED_TTL_S,
    RECONNECT_RETRIES,
    RESULT_POLL_S,
    EventParser,
    IdMinter,
    StreamItem,
    build_request,
    default_producer,
    overloaded_message,
    raise_for_error,
    redis_url,
    wait_budget,
)

log = logging.getLogger("batchd.client")


def _retrying(command):
    """Run an idempotent command, riding out a lost connection (a Redis restart).

    Retries live here, not in the connection pool: redis-py's pub/sub
    deadlocks when a pooled retry reconnects it.
    """
    delay = 0.1
    for attempt in range(RECONNECT_RETRIES):
        try:
            return command()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if attempt == RECONNECT_RETRIES - 1:
                raise
            log.warning("Redis unreachable (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


# Queued to every waiting handle after the pub/sub connection came back:
# events published meanwhile are lost, so read the stored result now.
_RECHECK: bytes = object()  # type: ignore[assignment]


class RequestHandle:
    """A submitted request: wait for its result, stream it, or cancel it."""

    def __init__(self, client: "Client", request_id: str, wait_s: float | None):
        self.request_id = request_id
        self._client = client
        self._events: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._parser = EventParser(request_id)
        self._wait_s = wait_s

    def __iter__(self) -> Iterator[StreamItem]:
        """Token deltas as they are produced, then the final Result."""
        try:
            give_up = time.monotonic() + self._wait_s if self._wait_s is not None else None
            while self._parser.result is None:
                payload = self._next_payload(give_up)
                item = self._parser.parse(payload)
                if item is None:
                    continue
                if isinstance(item, Result):
                    yield raise_for_error(item)
                    return
                yield item
        except GeneratorExit:
            if self._parser.result is None:
                self._client._abandon(self.request_id)
            raise
        finally:
            self._client._forget(self.request_id)

    def result(self) -> Result:
        """Block until the final result; raise its typed error if it failed."""
        for item in self:
            if isinstance(item, Result):
                return item
        raise AssertionError("stream ended without a result")  # __iter__ always ends on one

    def cancel(self) -> None:
        self._client.cancel(self.request_id)

    def _next_payload(self, give_up: float | None) -> bytes:
        while True:
            wait = RESULT_POLL_S
            if give_up is not None:
                wait = min(wait, give_up - time.monotonic())
                if wait <= 0:
                    raise ResultTimeout(
                        f"no result for request {self.request_id} in time; it may still run "
                        "(raise timeout, or check that workers are live with `batchd status`)",
                        self.request_id)
            try:
                payload = self._events.get(timeout=wait)
                if payload is not _RECHECK:
                    return payload
            except queue.Empty:
                pass
            stored = self._client._stored_result(self.request_id)
            if stored is not None:
                return stored

    def _deliver(self, payload: bytes) -> None:
        self._events.put(payload)


class _Router(threading.Thread):
    """Owns the pub/sub connection; routes each message to its request."""

    def __init__(self, redis_client: redis.Redis, keys: Keys, pattern: str):
        super().__init__(name="batchd-client-router", daemon=True)
        self._pubsub = redis_client.pubsub(ignore_subscribe_messages=False)
        self._channel_prefix = keys.channel("")
        self._handles: dict[str, RequestHandle] = {}
        self._subscribe_queue: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        self._confirm: dict[str, threading.Event] = {}
        self._running = True
        self._pubsub.psubscribe(pattern)
        self._wait_confirmation(pattern)

    def _wait_confirmation(self, name: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=1.0)
            if message and message["type"] in ("psubscribe", "subscribe"):
                return
        raise ConnectionError("Redis did not confirm the client's subscription")

    def register(self, handle: RequestHandle) -> None:
        self._handles[handle.request_id] = handle

    def forget(self, request_id: str, explicit: bool) -> None:
        self._handles.pop(request_id, None)
        if explicit:
            self._subscribe_queue.put((f"-{self._channel_prefix}{request_id}", threading.Event()))

    def subscribe(self, channel: str, timeout: float = 10.0) -> None:
        """Subscribe from any thread; returns once Redis confirmed it."""
        done = threading.Event()
        self._subscribe_queue.put((channel, done))
        if not done.wait(timeout):
            raise ConnectionError(f"Redis did not confirm the subscription to {channel}")

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        backoff = 0.1
        lost = False
        while self._running:
            try:
                # get_message reconnects a dropped connection; subscribe must only run on a
                # live one (redis-py's subscribe deadlocks when it has to reconnect).
                message = self._pubsub.get_message(timeout=0.05)
                self._drain_subscribe_queue()
                backoff = 0.1
                if lost:
                    lost = False
                    for handle in list(self._handles.values()):
                        handle._deliver(_RECHECK)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, backoff)
                lost = True
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if message is not None:
                self._route(message)
        self._pubsub.close()

    def _drain_subscribe_queue(self) -> None:
        while True:
            try:
                channel, done = self._subscribe_queue.get_nowait()
            except queue.Empty:
                return
            if channel.startswith("-"):
                self._pubsub.unsubscribe(channel[1:])
                continue
            self._confirm[channel] = done
            try:
                self._pubsub.subscribe(channel)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._subscribe_queue.put((channel, done))  # again once the connection is back
                raise

    def _route(self, message: dict) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "subscribe":
            done = self._confirm.pop(channel, None)
            if done is not None:
                done.set()
            return
        if kind not in ("message", "pmessage"):
            return
        handle = self._handles.get(channel[len(self._channel_prefix):])
        if handle is not None:
            handle._deliver(message["data"])


class Client:
    """Submit generation requests to batchd and read their results.

    `Client(url)` connects to Redis (default `$BATCHD_REDIS_URL`, then
    redis://127.0.0.1:6379/0; `rediss://` for TLS, user:password@ for ACL).
    """

    def __init__(self, url: str | None = None, *, prefix: str = "batchd:", producer: str | None = None,
                 max_connections: int = 64, socket_timeout: float = 30.0):
        self.keys = Keys(prefix)
        self.producer = producer or default_producer()
        self._redis = redis.Redis.from_url(
            redis_url(url), max_connections=max_connections, socket_timeout=socket_timeout,
            socket_connect_timeout=10.0, health_check_interval=30,
            retry_on_timeout=True)
        self._ids = IdMinter()
        self._submit = self._redis.register_script(scripts.SUBMIT)
        self._router = _Router(self._redis, self.keys, self.keys.channel_pattern(self._ids.client_id + "-"))
        self._router.start()

    # -- public API -----------------------------------------------------
    def submit(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] | str | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False, contrast_alpha: float | None = None, priority: int = 0,
               timeout: float | None = None, deadline: float | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Enqueue one request and return its handle at once.

        Raises InvalidRequest for bad arguments and Overloaded when the queue
        is full. Submitting again with the same request_id never runs it twice.
        """
        explicit = request_id is not None
        request_id = request_id or self._ids.next()
        request, payload = build_request(
            request_id, prompt, messages, prompt_token_ids, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, contrast_alpha=contrast_alpha,
            priority=priority,
            producer=self.producer, timeout=timeout, deadline=deadline)
        return self._send(request, payload, explicit, timeout)

    def _send(self, request: Request, payload: bytes, explicit: bool, timeout: float | None) -> RequestHandle:
        request_id = request.id
        handle = RequestHandle(self, request_id, wait_budget(timeout, request.deadline))
        self._router.register(handle)
        if explicit and not self._ids.owns(request_id):
            self._router.subscribe(self.keys.channel(request_id))
        try:
            outcome = _retrying(lambda: self._submit(
                keys=[self.keys.requests, self.keys.accepted(request_id), self.keys.config],
                args=[request_id, payload, ACCEPTED_TTL_S]))
        except BaseException:
            self._forget(request_id)
            raise
        if outcome == -1:
            self._forget(request_id)
            raise Overloaded(overloaded_message(self.keys.requests), request_id)
        return handle

    def generate(self, prompt: str | None = None, **kwargs) -> Result:
        """Submit and wait for the final result (see submit for the arguments)."""
        return self.submit(prompt, **kwargs).result()

    def stream(self, prompt: str | None = None, **kwargs) -> Iterator[StreamItem]:
        """Submit and yield Delta items as tokens arrive, then the final Result."""
        return iter(self.submit(prompt, **kwargs))

    def next_token_logprobs(self, prompt_token_ids: Sequence[int], top_k: int | None = None,
                            timeout: float | None = None) -> scoring.NextTokenLogprobs:
        """Log-probabilities of the token after the prompt: the full vector, or the top_k most likely."""
        request, payload = scoring.next_token_request(self._ids.next(), prompt_token_ids, top_k,
                                                      producer=self.producer, timeout=timeout)
        return scoring.next_token_logprobs(self._send(request, payload, False, timeout).result())

    def score(self, prompt: str | None = None, continuation: str | None = None, *,
              prompt_token_ids: Sequence[int] | None = None, continuation_token_ids: Sequence[int] | None = None,
              timeout: float | None = None) -> scoring.Score:
        """Log-probability of the continuation after the prompt (text or token ids), token by token."""
        request, payload = scoring.score_request(self._ids.next(), prompt, continuation, prompt_token_ids,
                                                 continuation_token_ids, producer=self.producer, timeout=timeout)
        return scoring.score(self._send(request, payload, False, timeout).result())

    def cancel(self, request_id: str) -> None:
        """Ask batchd to stop a request; its slot is freed within one engine step."""
        def send() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancelled(request_id), 1, ex=ACCEPTED_TTL_S)
                pipe.publish(self.keys.cancel_channel, request_id)
                pipe.execute()

        _retrying(send)

    def fetch_result(self, request_id: str) -> Result | None:
        """The stored final result of any request id, or None if not finished."""
        stored = self._stored_result(request_id)
        if stored is None:
            return None
        parser = EventParser(request_id)
        parser.parse(stored)
        return parser.result

    def close(self) -> None:
        self._router.stop()
        self._router.join(timeout=2)
        self._redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------
    def _stored_result(self, request_id: str) -> bytes | None:
        try:
            return self._redis.get(self.keys.result(request_id))
        except (redis.ConnectionError, redis.TimeoutError):
            return None

    def _abandon(self, request_id: str) -> None:
        """The caller stopped reading a stream before its end: free the slot for someone else."""
        try:
            self.cancel(request_id)
        except redis.RedisError as exc:
            log.warning("could not cancel abandoned request %s: %s", request_id, exc)

    def _forget(self, request_id: str) -> None:
        self._router.forget(request_id, explicit=not self._ids.owns(request_id))
