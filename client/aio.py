"""AsyncClient: the asyncio producer API.

Concurrent submits from one event loop are coalesced into one pipeline per
loop iteration, so ten thousand `await client.generate(...)` calls cost a few
hundred round trips, not ten thousand. One pub/sub connection, read by one
task, routes events to every waiting request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import AsyncIterator, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, TimeoutError as RedisTimeoutError

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


class AsyncRequestHandle:
    """A submitted request: await its result, stream it, or cancel it."""

    def __init__(self, client: "AsyncClient", request_id: str, wait_s: float | None):
        self.request_id = request_id
        self._client = client
        self._events: deque[bytes] = deque()
        self._waiter: asyncio.Future | None = None
        self._parser = EventParser(request_id)
        self._wait_s = wait_s

    async def __aiter__(self) -> AsyncIterator[StreamItem]:
        try:
            give_up = time.monotonic() + self._wait_s if self._wait_s is not None else None
            while self._parser.result is None:
                item = self._parser.parse(await self._next_payload(give_up))
                if item is None:
                    continue
                if isinstance(item, Result):
                    yield raise_for_error(item)
                    return
                yield item
        except GeneratorExit:
            if self._parser.result is None:  # the caller stopped reading: free the slot
                try:
                    await self._client.cancel(self.request_id)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    log.warning("could not cancel abandoned request %s: %s", self.request_id, exc)
            raise
        finally:
            await self._client._forget(self.request_id)

    async def result(self) -> Result:
        # A plain loop rather than `async for` over __aiter__: an async generator
        # left before its end is closed through the event loop, which cost a
        # thread-safe wake-up and a task per request.
        try:
            give_up = time.monotonic() + self._wait_s if self._wait_s is not None else None
            while True:
                item = self._parser.parse(await self._next_payload(give_up))
                if isinstance(item, Result):
                    return raise_for_error(item)
        finally:
            await self._client._forget(self.request_id)

    async def cancel(self) -> None:
        await self._client.cancel(self.request_id)

    async def _next_payload(self, give_up: float | None) -> bytes:
        while True:
            wait = RESULT_POLL_S
            if give_up is not None:
                wait = min(wait, give_up - time.monotonic())
                if wait <= 0:
                    raise ResultTimeout(
                        f"no result for request {self.request_id} in time; it may still run "
                        "(raise timeout, or check that workers are live with `batchd status`)",
                        self.request_id)
            if self._events:
                return self._events.popleft()
            # A bare future and a timer: asyncio.wait_for(queue.get()) would cost
            # a Task per event, a large share of the client's time at high rates.
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = loop.call_later(wait, _wake, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if self._events:
                return self._events.popleft()
            stored = await self._client._stored_result(self.request_id)
            if stored is not None:
                return stored

    def _deliver(self, payload: bytes) -> None:
        self._events.append(payload)
        _wake(self._waiter)


def _wake(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class AsyncClient:
    """asyncio twin of Client; create it inside the event loop that uses it."""

    def __init__(self, url: str | None = None, *, prefix: str = "batchd:", producer: str | None = None,
                 max_connections: int = 64, socket_timeout: float = 30.0):
        self.keys = Keys(prefix)
        self.producer = producer or default_producer()
        self._redis = aioredis.Redis.from_url(
            redis_url(url), max_connections=max_connections, socket_timeout=socket_timeout,
            socket_connect_timeout=10.0, health_check_interval=30, retry_on_timeout=True)
        self._ids = IdMinter()
        self._channel_prefix = self.keys.channel("")
        self._handles: dict[str, AsyncRequestHandle] = {}
        self._confirm: dict[str, asyncio.Future] = {}
        self._pending_submits: list[tuple[list, list, asyncio.Future]] = []
        self._flush_scheduled = False
        self._submit_sha: str | None = None
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._start_lock = asyncio.Lock()

    async def _start(self) -> None:
        async with self._start_lock:
            if self._reader is not None:
                return
            self._submit_sha = await self._redis.script_load(scripts.SUBMIT)
            self._pubsub = self._redis.pubsub()
            pattern = self.keys.channel_pattern(self._ids.client_id + "-")
            await self._pubsub.psubscribe(pattern)
            while True:  # the subscription must be live before the first submit
                message = await self._pubsub.get_message(timeout=10.0)
                if message is None:
                    raise RedisConnectionError("Redis did not confirm the client's subscription")
                if message["type"] == "psubscribe":
                    break
            self._reader = asyncio.create_task(self._read_events(), name="batchd-client-router")

    # -- public API -----------------------------------------------------
    async def submit(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                     prompt_token_ids: Sequence[int] | None = None, max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, stop: Sequence[str] | str | None = None,
                     stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                     contrast_alpha: float | None = None, priority: int = 0, timeout: float | None = None,
                     deadline: float | None = None, request_id: str | None = None) -> AsyncRequestHandle:
        """Enqueue one request; see Client.submit."""
        await self._start()
        explicit = request_id is not None
        request_id = request_id or self._ids.next()
        request, payload = build_request(
            request_id, prompt, messages, prompt_token_ids, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, contrast_alpha=contrast_alpha,
            priority=priority,
            producer=self.producer, timeout=timeout, deadline=deadline)
        return await self._send(request, payload, explicit, timeout)

    async def _send(self, request: Request, payload: bytes, explicit: bool,
                    timeout: float | None) -> AsyncRequestHandle:
        request_id = request.id
        handle = AsyncRequestHandle(self, request_id, wait_budget(timeout, request.deadline))
        self._handles[request_id] = handle
        try:
            if explicit and not self._ids.owns(request_id):
                await self._subscribe(self.keys.channel(request_id))
            outcome = await self._enqueue(
                [self.keys.requests, self.keys.accepted(request_id), self.keys.config],
                [request_id, payload, ACCEPTED_TTL_S])
        except BaseException:
            await self._forget(request_id)
            raise
        if outcome == -1:
            await self._forget(request_id)
            raise Overloaded(overloaded_message(self.keys.requests), request_id)
        return handle

    async def generate(self, prompt: str | None = None, **kwargs) -> Result:
        handle = await self.submit(prompt, **kwargs)
        return await handle.result()

    async def stream(self, prompt: str | None = None, **kwargs) -> AsyncIterator[StreamItem]:
        handle = await self.submit(prompt, **kwargs)
        async for item in handle:
            yield item

    async def next_token_logprobs(self, prompt_token_ids: Sequence[int], top_k: int | None = None,
                                  timeout: float | None = None) -> scoring.NextTokenLogprobs:
        """See Client.next_token_logprobs."""
        await self._start()
        request, payload = scoring.next_token_request(self._ids.next(), prompt_token_ids, top_k,
                                                      producer=self.producer, timeout=timeout)
        handle = await self._send(request, payload, False, timeout)
        return scoring.next_token_logprobs(await handle.result())

    async def score(self, prompt: str | None = None, continuation: str | None = None, *,
                    prompt_token_ids: Sequence[int] | None = None,
                    continuation_token_ids: Sequence[int] | None = None,
                    timeout: float | None = None) -> scoring.Score:
        """See Client.score."""
        await self._start()
        request, payload = scoring.score_request(self._ids.next(), prompt, continuation, prompt_token_ids,
                                                 continuation_token_ids, producer=self.producer, timeout=timeout)
        handle = await self._send(request, payload, False, timeout)
        return scoring.score(await handle.result())

    async def cancel(self, request_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.cancelled(request_id), 1, ex=ACCEPTED_TTL_S)
            pipe.publish(self.keys.cancel_channel, request_id)
            await pipe.execute()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._redis.aclose()

    async def __aenter__(self) -> "AsyncClient":
        await self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- submit coalescing ----------------------------------------------------
    async def _enqueue(self, keys: list, args: list) -> int:
        future = asyncio.get_running_loop().create_future()
        self._pending_submits.append((keys, args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush_submits()))
        return await future

    async def _flush_submits(self) -> None:
        batch, self._pending_submits = self._pending_submits, []
        self._flush_scheduled = False
        try:
            outcomes = await self._run_submits(batch)
        except NoScriptError:  # Redis restarted and lost its script cache
            self._submit_sha = await self._redis.script_load(scripts.SUBMIT)
            try:
                outcomes = await self._run_submits(batch)
            except Exception as exc:
                outcomes = [exc] * len(batch)
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, _, future), outcome in zip(batch, outcomes):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(int(outcome))

    async def _run_submits(self, batch) -> list:
        """One pipeline of SUBMIT calls; idempotent, so a lost connection is retried with backoff."""
        delay = 0.1
        for attempt in range(RECONNECT_RETRIES):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for keys, args, _ in batch:
                        pipe.evalsha(self._submit_sha, len(keys), *keys, *args)
                    return await pipe.execute(raise_on_error=True)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if attempt == RECONNECT_RETRIES - 1:
                    raise
                log.warning("Redis unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- events -----------------------------------------------------------
    async def _subscribe(self, channel: str) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirm[channel] = confirmed
        await self._pubsub.subscribe(channel)
        await asyncio.wait_for(confirmed, 10.0)

    async def _read_events(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if message is not None:
                self._route(message)

    def _route(self, message: dict) -> None:
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if message["type"] == "subscribe":
            confirmed = self._confirm.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(True)
            return
        if message["type"] not in ("message", "pmessage"):
            return
        handle = self._handles.get(channel[len(self._channel_prefix):])
        if handle is not None:
            handle._deliver(message["data"])

    async def _stored_result(self, request_id: str) -> bytes | None:
        try:
            return await self._redis.get(self.keys.result(request_id))
        except (RedisConnectionError, RedisTimeoutError):
            return None

    async def _forget(self, request_id: str) -> None:
        self._handles.pop(request_id, None)
        if not self._ids.owns(request_id) and self._pubsub is not None:
            try:
                await self._pubsub.unsubscribe(self.keys.channel(request_id))
            except (RedisConnectionError, RedisTimeoutError):
                pass
