"""AsyncClient: the asyncio producer API.

Concurrent submits from one event loop are coalesced into one pipeline per
loop iteration, so ten thousand `await client.generate(...)` calls cost a few
hundred round trips, not ten thousand. One pub/sub connection, read by one
task, routes events to every waiting request. What is sent and how events are
read is the shared core's (core.py), as for Client; this module moves the bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from . import core, scoring, tokenizers
from .connection import (
    CONNECTION_LOST,
    AsyncMasterClients,
    acl_user,
    fleet_shards_async,
    async_pubsub_pool,
    close_async_redis,
    is_cluster,
    is_moved,
    node_of,
    open_async_redis,
    relearn_slots_async,
)
from .errors import BrokerUnavailable
from .keys import tenant_id
from .protocol import Request, Result, TokenizerInfo
from .scripts import ScriptCall, needs_loading

log = logging.getLogger("batchd.client")
# How long one pub/sub read waits: with shard channels, short while requests are in flight or
# subscriptions wait to go out; otherwise long (Client's router does the same).
_BUSY_WAIT_S, _IDLE_WAIT_S = 0.002, 0.05

T = TypeVar("T")


async def _retrying(command: Callable[[], Awaitable[T]], what: str) -> T:
    """Run an idempotent command within the retry budget, as Client does (sync._retrying)."""
    for delay in core.retry_delays():
        try:
            return await command()
        except RedisError as exc:
            if not core.is_transient(exc):
                raise core.unavailable(exc, what) from exc
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
    try:
        return await command()
    except RedisError as exc:
        raise core.unavailable(exc, what) from exc


class _Subscription(PubSub):
    """connection.Subscription for asyncio: notes every (re)connect, which redis-py makes silently."""

    reconnected = False

    async def on_connect(self, connection) -> None:
        self.reconnected = True
        await super().on_connect(connection)


class AsyncRequestHandle:
    """A submitted request: await its result, stream it, or cancel it."""

    def __init__(self, client: "AsyncClient", reading: core.Reading):
        self.request_id = reading.request_id
        self._client = client
        self._events: deque[bytes] = deque()
        self._waiter: asyncio.Future | None = None
        self._reading = reading

    async def __aiter__(self) -> AsyncIterator[core.StreamItem]:
        try:
            self._reading.begin()
            while not self._reading.done:
                item = self._reading.take(await self._next_payload())
                if item is not None:
                    yield item
        except GeneratorExit:
            if not self._reading.done:  # the caller stopped reading: free the slot
                try:
                    await self._client.cancel(self.request_id)
                except BrokerUnavailable as exc:
                    log.warning("could not cancel abandoned request %s: %s", self.request_id, exc)
            raise
        finally:
            await self._client._forget(self.request_id)

    async def result(self) -> Result:
        # A plain loop rather than `async for` over __aiter__: an async generator
        # left before its end is closed through the event loop, which cost a
        # thread-safe wake-up and a task per request.
        try:
            self._reading.begin()
            while True:
                item = self._reading.take(await self._next_payload())
                if isinstance(item, Result):
                    return item
        finally:
            await self._client._forget(self.request_id)

    async def cancel(self) -> None:
        await self._client.cancel(self.request_id)

    async def _next_payload(self) -> bytes:
        while True:
            wait = self._reading.next_wait_s()
            if not self._events:
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
                payload = self._events.popleft()
                step = self._reading.triage(payload)
                if step == core.TAKE:
                    return payload
                if step == core.IGNORE:
                    continue
            stored = await self._client._stored_result(self.request_id)
            if stored is not None:
                return stored

    def _deliver(self, payload: bytes) -> None:
        self._events.append(payload)
        _wake(self._waiter)


def _wake(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class AsyncClient(core.ClientCore[Awaitable[AsyncRequestHandle]]):
    """asyncio twin of Client; create it inside the event loop that uses it."""

    def __init__(self, url: str | None = None, *, prefix: str = "batchd:", producer: str | None = None,
                 max_connections: int = 64, socket_timeout: float = 30.0, cancel_key: str | bytes | None = None,
                 durable_replicas: int = 0, tenant: str | None = None, shards: int | None = None):
        self._redis = open_async_redis(
            url, wait_for_connection=True, max_connections=max_connections, socket_timeout=socket_timeout,
            socket_connect_timeout=10.0, health_check_interval=30, retry_on_timeout=True)
        super().__init__(prefix, producer, cancel_key, durable_replicas,
                         core.resolve_tenant(tenant, acl_user(self._redis)), shards, is_cluster(self._redis))
        # On a cluster: a client per master, for durable submits (WAIT on the writer's connection).
        self._masters = AsyncMasterClients(self._redis) if is_cluster(self._redis) else None
        self._handles: dict[str, AsyncRequestHandle] = {}
        self._confirm: dict[str, asyncio.Future] = {}
        # (un)subscriptions for the reader to make, on a live connection only: a SUBSCRIBE sent
        # while the reader reconnects reads the same socket as the reader.
        self._subscription_changes: deque[tuple[bool, str]] = deque()
        # Shard-channel changes whose master could not be reached, to be tried again.
        self._shard_changes = core.ShardChanges()
        self._renew_shard_subscription = False
        self._pending_submits: list[tuple[ScriptCall, asyncio.Future]] = []
        self._pending_reads: list[tuple[str, asyncio.Future]] = []
        self._flush_scheduled = False
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._closing = False
        self._start_lock = asyncio.Lock()

    async def _start(self) -> None:
        """Subscribe to this client's result channels (before its first submit), riding out an
        outage within the retry budget; a failed start is tried again by the next call."""
        async with self._start_lock:
            if self._reader is not None:
                return
            core.check_fleet_shards(await fleet_shards_async(self._redis, self.keys), self.keys.shards)
            await _retrying(self._subscribe_pattern, "subscribing for results")
            self._reader = asyncio.create_task(self._read_events(), name="batchd-client-router")

    async def _subscribe_pattern(self) -> None:
        if self._pubsub is not None:
            await self._pubsub.aclose()  # a half-made subscription from a failed try
        if self.keys.shard_channels:
            # No pattern: each request subscribes its own shard channel (see Client's router).
            self._pubsub = self._redis.pubsub()
            return
        self._pubsub = _Subscription(await async_pubsub_pool(self._redis))
        await self._pubsub.psubscribe(self.keys.channel_pattern(self._ids.id_prefix))
        while True:  # the subscription must be live before the first submit
            message = await self._pubsub.get_message(timeout=10.0)
            if message is None:
                raise RedisConnectionError("Redis did not confirm the client's subscription")
            if message["type"] == "psubscribe":
                break
        self._pubsub.reconnected = False

    # -- public API (submit: core.ClientCore) -----------------------------------------
    async def generate(self, prompt: str | None = None, **kwargs) -> Result:
        handle = await self.submit(prompt, **kwargs)
        return await handle.result()

    async def stream(self, prompt: str | None = None, **kwargs) -> AsyncIterator[core.StreamItem]:
        handle = await self.submit(prompt, **kwargs)
        async for item in handle:
            yield item

    async def next_token_logprobs(self, prompt_token_ids: Sequence[int], top_k: int | None = None,
                                  timeout: float | None = None, model: str | None = None,
                                  logprobs_dtype: str = "float32",
                                  prefix_pin: str | None = None) -> scoring.NextTokenLogprobs:
        """See Client.next_token_logprobs."""
        request_id = self._ids.next()
        request, payload = scoring.next_token_request(request_id, prompt_token_ids, top_k,
                                                      producer=self.producer, timeout=timeout, model=model,
                                                      logprobs_dtype=logprobs_dtype, prefix_pin=prefix_pin,
                                                      **self._secrets(request_id))
        handle = await self._send(request, payload, False, timeout)
        return scoring.next_token_logprobs(await handle.result())

    async def next_token_logprobs_rows(self, rows: Sequence[Sequence[int]], prompt_token_ids: Sequence[int] = (),
                                       *, prefix_pin: str | None = None, top_k: int | None = None,
                                       timeout: float | None = None, model: str | None = None,
                                       logprobs_dtype: str = "float32") -> scoring.NextTokenLogprobsRows:
        """See Client.next_token_logprobs_rows."""
        request_id = self._ids.next()
        request, payload = scoring.next_token_request(request_id, prompt_token_ids, top_k,
                                                      producer=self.producer, timeout=timeout, model=model,
                                                      logprobs_dtype=logprobs_dtype, prefix_pin=prefix_pin,
                                                      rows=rows, **self._secrets(request_id))
        handle = await self._send(request, payload, False, timeout)
        return scoring.NextTokenLogprobsRows(len(rows), await handle.result())

    async def pin(self, token_ids: Sequence[int], ttl_s: int = 600, *, model: str | None = None,
                  timeout: float | None = None) -> scoring.Pin:
        """See Client.pin."""
        return await self._pin(token_ids, None, ttl_s, model, timeout)

    async def renew_pin(self, handle: str, ttl_s: int = 600, *, model: str | None = None,
                        timeout: float | None = None) -> scoring.Pin:
        """See Client.renew_pin."""
        return await self._pin(None, handle, ttl_s, model, timeout)

    async def unpin(self, handle: str, *, model: str | None = None, timeout: float | None = None) -> None:
        """See Client.unpin."""
        request_id = self._ids.next()
        request, payload = scoring.unpin_request(request_id, handle, producer=self.producer, timeout=timeout,
                                                 model=model, **self._secrets(request_id))
        await (await self._send(request, payload, False, timeout)).result()

    async def _pin(self, token_ids, handle, ttl_s, model, timeout) -> scoring.Pin:
        request_id = self._ids.next()
        request, payload = scoring.pin_request(request_id, token_ids, producer=self.producer, timeout=timeout,
                                               model=model, ttl_s=ttl_s, handle=handle, **self._secrets(request_id))
        return scoring.pin(await (await self._send(request, payload, False, timeout)).result(), ttl_s)

    async def score(self, prompt: str | None = None, continuation: str | None = None, *,
                    prompt_token_ids: Sequence[int] | None = None,
                    continuation_token_ids: Sequence[int] | None = None,
                    timeout: float | None = None, model: str | None = None,
                    messages: Sequence[dict] | None = None) -> scoring.Score:
        """See Client.score."""
        request_id = self._ids.next()
        request, payload = scoring.score_request(request_id, prompt, continuation, prompt_token_ids,
                                                 continuation_token_ids, producer=self.producer, timeout=timeout,
                                                 model=model, messages=messages, **self._secrets(request_id))
        handle = await self._send(request, payload, False, timeout)
        return scoring.score(await handle.result())

    async def models(self) -> list[str]:
        """See Client.models."""
        async def read() -> list[str]:
            worker_ids = await self._redis.zrange(self.keys.workers, 0, -1)
            beats = await self._redis.mget([self.keys.heartbeat(w.decode()) for w in worker_ids]) if worker_ids else []
            return core.served_models(beats)

        return await _retrying(read, "listing the models served")

    async def served_tokenizer(self, model: str | None = None) -> tokenizers.ServedTokenizer:
        """See Client.served_tokenizer."""
        name = model or tokenizers.the_only_model(await self.models())
        info, files = await _retrying(lambda: self._redis.hmget(self.keys.tokenizer(name), ["info", "files"]),
                                      f"reading the tokenizer of {name}")
        return tokenizers.stored_tokenizer(info, files, name)

    async def tokenizer_info(self, model: str | None = None) -> TokenizerInfo:
        """See Client.tokenizer_info."""
        name = model or tokenizers.the_only_model(await self.models())
        info = await _retrying(lambda: self._redis.hget(self.keys.tokenizer(name), "info"),
                               f"reading the tokenizer of {name}")
        return tokenizers.stored_info(info, name)

    async def check_tokenizer(self, tokenizer: Any, model: str | None = None) -> None:
        """See Client.check_tokenizer."""
        name = model or tokenizers.the_only_model(await self.models())
        tokenizers.check(tokenizer, await self.tokenizer_info(name), name)

    async def cancel(self, request_id: str) -> None:
        """See Client.cancel."""
        request_id = tenant_id(self.tenant, request_id)

        async def send() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                core.queue_cancel(pipe, self.keys, request_id, self._cancel_secrets.secret(request_id))
                await pipe.execute()

        await _retrying(send, f"cancel of {request_id}")

    async def close(self) -> None:
        if self._reader is not None:
            # A flag, not Task.cancel(): redis-py's get_message can swallow a cancel that
            # lands while its own read timeout fires, leaving the reader running.
            self._closing = True
            try:
                await self._reader
            except Exception:
                pass
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._masters is not None:
            await self._masters.aclose()
        await close_async_redis(self._redis)

    async def __aenter__(self) -> "AsyncClient":
        try:
            await self._start()
        except BrokerUnavailable as exc:
            # Opened during an outage: the first submit subscribes once Redis is back.
            log.warning("batchd client starts without Redis (%s); submits will retry", exc)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- submitting -----------------------------------------------------------
    async def _send(self, request: Request, payload: bytes, explicit: bool,
                    timeout: float | None) -> AsyncRequestHandle:
        await self._start()
        handle = AsyncRequestHandle(self, self._reading(request, timeout))
        self._handles[request.id] = handle
        try:
            if self._needs_own_subscription(request.id, explicit):
                await self._subscribe(self.keys.channel(request.id))
            outcome = await self._enqueue(self._submit_call(request, payload))
        except BaseException:
            await self._forget(request.id)
            raise
        if outcome == -1:
            await self._forget(request.id)
            raise self._overloaded(request.id)
        return handle

    async def _enqueue(self, call: ScriptCall) -> int:
        """One SUBMIT, sent in the pipeline of every submit of this event-loop iteration."""
        future = asyncio.get_running_loop().create_future()
        self._pending_submits.append((call, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush_submits()))
        return await future

    async def _flush_submits(self) -> None:
        batch, self._pending_submits = self._pending_submits, []
        self._flush_scheduled = False
        try:
            outcomes = await _retrying(lambda: self._run_submits([call for call, _ in batch]), "submit")
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(int(outcome))

    async def _run_submits(self, calls: list[ScriptCall]) -> list:
        """One pipeline of SUBMIT calls; each the server answered NOSCRIPT (it restarted) runs again
        on its own, as run_in_pipeline does for Client and the daemons."""
        if self.durable_replicas and is_cluster(self._redis):
            return await self._run_durable_submits_on_cluster(calls)
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                script.queue(pipe, keys, args)
            if self.durable_replicas:  # in the same pipeline: WAIT covers this connection's writes
                pipe.wait(self.durable_replicas, core.DURABLE_WAIT_MS)
            replies = await pipe.execute(raise_on_error=False)
        outcomes = replies[:len(calls)]
        if self.durable_replicas:
            outcomes = core.durable_outcomes(outcomes, replies[-1], self.durable_replicas,
                                             f"submit of {len(calls)} requests")
        for index, (script, keys, args) in enumerate(calls):
            if needs_loading(outcomes[index]):
                outcomes[index] = await script.run_async(self._redis, keys, args)
        for outcome in outcomes:
            if isinstance(outcome, RedisError) and core.is_transient(outcome):
                raise outcome  # retried: a second submission of an id never runs twice
        return [core.unavailable(outcome, "submit") if isinstance(outcome, RedisError) else outcome
                for outcome in outcomes]

    # -- events -----------------------------------------------------------
    async def _subscribe(self, channel: str) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirm[channel] = confirmed
        self._subscription_changes.append((True, channel))
        # While a cluster's slots move or a master fails over, redis-py's sharded subscription
        # can lose track of a node: SSUBSCRIBEs sent there, to healthy slots too, were never
        # confirmed, and submits were refused after 10 s (benchmarks/failover_load.py). After
        # 2 s unconfirmed, the reader starts a fresh one and subscribes everything again.
        attempts = core.SHARD_SUBSCRIBE_ROUNDS if self.keys.shard_channels else 1
        for attempt in range(attempts):
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), 10.0 / attempts)
                return
            except asyncio.TimeoutError:
                if attempt + 1 < attempts:
                    self._renew_shard_subscription = True
        confirmed.cancel()
        self._confirm.pop(channel, None)
        raise BrokerUnavailable(f"Redis did not confirm the subscription to {channel} within 10 s")

    async def _read_events(self) -> None:
        backoff = core.reconnect_backoff()
        moving: tuple[list, list] | None = None  # see Client's router: a cluster node failed
        while not self._closing:
            try:
                if moving is not None:
                    await self._move_subscription(*moving)
                    moving = None
                if self._renew_shard_subscription:
                    await self._renew_shard_subscriptions()
                message = await self._next_message()
                if self._subscription_changes or self._shard_changes:
                    await self._change_subscriptions()
                backoff.reset()
            except (RedisError, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, delay)
                if is_cluster(self._redis) and not self.keys.shard_channels and moving is None:
                    moving = (list(self._pubsub.patterns), list(self._pubsub.channels))
                await asyncio.sleep(delay)
                continue
            if getattr(self._pubsub, "reconnected", False):
                core.recheck_after_reconnect(self._pubsub, self._handles)
            if message is not None:
                self._route(message)

    async def _next_message(self) -> dict | None:
        """The next pub/sub message, waiting briefly (as Client's router does: a queued
        subscription goes out between reads)."""
        busy = self.keys.shard_channels and (self._handles or self._subscription_changes or self._shard_changes)
        wait_s = _BUSY_WAIT_S if busy else _IDLE_WAIT_S
        if self.keys.shard_channels:
            if not self._pubsub.shard_channels:  # ClusterPubSub takes an empty read for a lost topology
                await asyncio.sleep(wait_s)
                return None
            return await self._pubsub.get_sharded_message(timeout=wait_s)
        return await self._pubsub.get_message(timeout=wait_s)

    async def _run_durable_submits_on_cluster(self, calls: list[ScriptCall]) -> list:
        """Durable SUBMITs on a cluster: one pipeline per master, each its writes then WAIT, on a
        connection to that master (WAIT counts the writes of its own connection)."""
        by_master: dict[int, tuple[Any, list[int]]] = {}
        for index, (_script, keys, _args) in enumerate(calls):
            master = await self._masters.of(keys[0])
            by_master.setdefault(id(master), (master, []))[1].append(index)

        async def on(master, indices: list[int]) -> list:
            try:
                async with master.pipeline(transaction=False) as pipe:
                    for i in indices:
                        calls[i][0].queue(pipe, calls[i][1], calls[i][2])
                    pipe.wait(self.durable_replicas, core.DURABLE_WAIT_MS)
                    replies = await pipe.execute(raise_on_error=False)
            except CONNECTION_LOST:
                await relearn_slots_async(self._redis)  # the master died: the retry finds its successor
                raise
            if any(is_moved(reply) for reply in replies):
                await relearn_slots_async(self._redis)  # a slot moved: learn where, and try again
            return core.durable_outcomes(replies[:-1], replies[-1], self.durable_replicas,
                                         f"submit of {len(indices)} requests")

        outcomes: list = [None] * len(calls)
        groups = list(by_master.values())
        for (_master, indices), replies in zip(groups, await asyncio.gather(*(on(m, i) for m, i in groups))):
            for i, reply in zip(indices, replies):
                outcomes[i] = reply
        for outcome in outcomes:
            if isinstance(outcome, RedisError) and (core.is_transient(outcome) or needs_loading(outcome)):
                raise outcome  # retried whole: a second submission of an id never runs twice
        return [core.unavailable(outcome, "submit") if isinstance(outcome, RedisError) else outcome
                for outcome in outcomes]

    async def _move_subscription(self, patterns: list, channels: list) -> None:
        """Client._Router._move_subscription for asyncio."""
        old = self._pubsub
        self._pubsub = _Subscription(await async_pubsub_pool(self._redis, avoid=old.connection_pool))
        try:
            await old.aclose()
        except (RedisError, OSError):
            pass
        if patterns:
            await self._pubsub.psubscribe(*patterns)
        if channels:
            await self._pubsub.subscribe(*channels)
        self._pubsub.reconnected = True
        kwargs = self._pubsub.connection_pool.connection_kwargs
        log.warning("pub/sub moved to cluster node %s:%s", kwargs.get("host"), kwargs.get("port"))

    async def _change_subscriptions(self) -> None:
        if self.keys.shard_channels:
            await self._change_shard_subscriptions()
            return
        while self._subscription_changes:
            subscribe, channel = self._subscription_changes[0]
            await (self._pubsub.subscribe(channel) if subscribe else self._pubsub.unsubscribe(channel))
            self._subscription_changes.popleft()  # only once sent: a lost connection leaves it queued

    async def _renew_shard_subscriptions(self) -> None:
        """A fresh sharded subscription, with every channel of the old one and every channel
        still waiting for its confirmation. Each confirmation nobody waits for makes its
        request read the stored result: nothing published meanwhile is missed."""
        self._renew_shard_subscription = False
        old = self._pubsub
        channels = self._routes.still_wanted([*old.shard_channels, *self._confirm], self._handles, self._confirm)
        self._pubsub = self._redis.pubsub()
        try:
            await old.aclose()
        except (RedisError, OSError):
            pass
        await relearn_slots_async(self._redis)
        queued = {channel for _, channel in self._subscription_changes}  # sent in their order
        self._subscription_changes.extend((True, c) for c in channels - queued)
        log.warning("renewed the sharded subscription of %d channels (one was not confirmed in 2 s)", len(channels))

    async def _change_shard_subscriptions(self) -> None:
        """Send the queued shard-channel changes, each to the master of its slot; those whose
        master cannot be reached are held back while the others go out (core.ShardChanges)."""
        now = asyncio.get_running_loop().time()
        sending = self._shard_changes.begin(now, list(self._subscription_changes), lambda c: node_of(self._redis, c))
        self._subscription_changes.clear()
        for subscribe, channel in sending:
            try:
                await (self._pubsub.ssubscribe(channel) if subscribe else self._pubsub.sunsubscribe(channel))
            except (RedisError, OSError) as exc:
                sending.fail(exc)
        failure = self._shard_changes.end(sending, now)
        if failure is not None:
            log.warning("could not change %d shard-channel subscription(s) (%s); trying again shortly",
                        len(sending.failed), failure)
            await relearn_slots_async(self._redis)  # a failed master's slots go to its successor

    def _route(self, message: dict) -> None:
        future = self._routes.route(message, self._handles, self._confirm)
        if future is not None and not future.done():
            future.set_result(True)

    async def _stored_result(self, request_id: str) -> bytes | None:
        """The stored result, read with every other handle's of this event-loop iteration in one
        MGET: each request reads it once (a final event is only a cue to read it), and thousands
        of concurrent reads would otherwise each take a pooled connection."""
        future = asyncio.get_running_loop().create_future()
        self._pending_reads.append((request_id, future))
        if len(self._pending_reads) == 1:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush_reads()))
        return await future

    async def _flush_reads(self) -> None:
        batch, self._pending_reads = self._pending_reads, []
        try:
            # A cluster answers an MGET of one slot only; its client splits one by slot.
            mget = self._redis.mget_nonatomic if is_cluster(self._redis) else self._redis.mget
            values = await mget([self.keys.result(request_id) for request_id, _ in batch])
        except RedisError as exc:
            log.warning("could not read %d stored results (%s); reading again shortly", len(batch), exc)
            values = [None] * len(batch)  # read again at the handle's next poll
        for (_, future), value in zip(batch, values):
            if not future.done():
                future.set_result(value)

    async def _forget(self, request_id: str) -> None:
        self._handles.pop(request_id, None)
        if self._needs_own_subscription(request_id, explicit=True):
            self._subscription_changes.append((False, self.keys.channel(request_id)))
