"""Client: the blocking producer API, safe to share between threads.

One Client holds one connection pool for commands and one pub/sub connection,
read by a single background thread that routes each event to the request it
belongs to; thousands of concurrent requests share both. What is sent and how
events are read is the shared core's (core.py); this module moves the bytes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

import redis

from . import core, scoring, tokenizers
from .connection import (
    CONNECTION_LOST,
    Subscription,
    acl_user,
    fleet_shards,
    close_redis,
    is_cluster,
    is_moved,
    master_client,
    node_of,
    open_redis,
    pubsub_pool,
    relearn_slots,
)
from .errors import BrokerUnavailable, WrongShards
from .keys import tenant_id
from .protocol import Request, Result, TokenizerInfo

log = logging.getLogger("batchd.client")

T = TypeVar("T")


def _retrying(command: Callable[[], T], what: str) -> T:
    """Run an idempotent command, riding out a lost connection (a Redis restart) and transient
    replies (core.is_transient) within the retry budget; every failure a caller sees is a
    batchd error (core.unavailable).

    Retries live here, not in the connection pool: redis-py's pub/sub
    deadlocks when a pooled retry reconnects it.
    """
    for delay in core.retry_delays():
        try:
            return command()
        except redis.RedisError as exc:
            if not core.is_transient(exc):
                raise core.unavailable(exc, what) from exc
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    try:
        return command()
    except redis.RedisError as exc:
        raise core.unavailable(exc, what) from exc


class RequestHandle:
    """A submitted request: wait for its result, stream it, or cancel it."""

    def __init__(self, client: "Client", reading: core.Reading):
        self.request_id = reading.request_id
        self._client = client
        self._events: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._reading = reading

    def __iter__(self) -> Iterator[core.StreamItem]:
        """Token deltas as they are produced, then the final Result."""
        try:
            self._reading.begin()
            while not self._reading.done:
                item = self._reading.take(self._next_payload())
                if item is not None:
                    yield item
        except GeneratorExit:
            if not self._reading.done:
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

    def _next_payload(self) -> bytes:
        while True:
            try:
                payload = self._events.get(timeout=self._reading.next_wait_s())
                step = self._reading.triage(payload)
                if step == core.TAKE:
                    return payload
                if step == core.IGNORE:
                    continue
            except queue.Empty:
                pass
            stored = self._client._stored_result(self.request_id)
            if stored is not None:
                return stored

    def _deliver(self, payload: bytes) -> None:
        self._events.put(payload)


class _Router(threading.Thread):
    """Owns the pub/sub connection; routes each message to its request.

    pattern: the client's one pattern subscription, or None where the fleet publishes on shard
    channels (Keys.shard_channels): there each request subscribes its own channel (SSUBSCRIBE)
    on the master of its shard, through redis-py's ClusterPubSub, which keeps a connection per
    master and follows the channels through failovers and slot migrations."""

    # How long one read waits for a message. A subscription goes out between reads, so with
    # shard channels (a subscription per request) the wait is short while requests are in
    # flight or subscriptions queued; otherwise, and while idle, long (a message ends a wait).
    BUSY_WAIT_S, IDLE_WAIT_S = 0.002, 0.05

    def __init__(self, redis_client: redis.Redis, routes: core.Routes, pattern: str | None):
        super().__init__(name="batchd-client-router", daemon=True)
        self._client = redis_client
        self._sharded = pattern is None
        self._pubsub = redis_client.pubsub() if self._sharded else \
            Subscription(pubsub_pool(redis_client), ignore_subscribe_messages=False)
        # On a cluster, the subscriptions (patterns, channels) to make again on another node
        # after this one's node failed; None while the subscription is where it should be.
        self._moving: tuple[list, list] | None = None
        self._routes = routes
        self._handles: dict[str, RequestHandle] = {}
        self._subscribe_queue: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        # Shard-channel changes whose master could not be reached, to be tried again.
        self._shard_changes = core.ShardChanges()
        self._confirm: dict[str, threading.Event] = {}
        self._running = True
        self._renew = False
        self._pattern = pattern
        # Set once the client's pattern subscription is confirmed: no submit goes out before
        # it. Made by the thread, so a Client created while Redis is down works once it is back.
        # With shard channels there is none: each submit waits for its own channel's.
        self.ready = threading.Event()
        if self._sharded:
            self.ready.set()

    def _subscribe_pattern(self) -> None:
        self._pubsub.psubscribe(self._pattern)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=1.0)
            if message and message["type"] in ("psubscribe", "subscribe"):
                self._pubsub.reconnected = False
                self.ready.set()
                return
        raise redis.ConnectionError("Redis did not confirm the client's subscription")

    def register(self, handle: RequestHandle) -> None:
        self._handles[handle.request_id] = handle

    def forget(self, request_id: str, channel: str | None) -> None:
        """Stop routing to a request; unsubscribe its own channel, if it has one."""
        self._handles.pop(request_id, None)
        if channel is not None:
            self._subscribe_queue.put(("-" + channel, threading.Event()))

    def subscribe(self, channel: str, timeout: float = 10.0) -> None:
        """Subscribe from any thread; returns once Redis confirmed it."""
        done = threading.Event()
        self._subscribe_queue.put((channel, done))
        # As AsyncClient: a shard channel unconfirmed after a fifth of the wait (2 s) has the
        # router start a fresh sharded subscription (redis-py's can lose track of a node while
        # slots move or a master fails over).
        attempts = core.SHARD_SUBSCRIBE_ROUNDS if self._sharded else 1
        for attempt in range(attempts):
            if done.wait(timeout / attempts):
                return
            if attempt + 1 < attempts:
                self._renew = True
        raise BrokerUnavailable(f"Redis did not confirm the subscription to {channel} within {timeout:.0f} s")

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        backoff = core.reconnect_backoff()
        while self._running:
            try:
                if self._moving is not None:
                    self._move_subscription()
                if not self.ready.is_set():
                    self._subscribe_pattern()
                if self._renew:
                    self._renew_shard_subscriptions()
                # get_message reconnects a dropped connection; subscribe must only run on a
                # live one (redis-py's subscribe deadlocks when it has to reconnect).
                message = self._next_message()
                self._drain_subscribe_queue()
                backoff.reset()
            except (redis.RedisError, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, delay)
                if not self._sharded and is_cluster(self._client) and self._moving is None and self.ready.is_set():
                    self._moving = (list(self._pubsub.patterns), list(self._pubsub.channels))
                time.sleep(delay)
                continue
            if getattr(self._pubsub, "reconnected", False):
                core.recheck_after_reconnect(self._pubsub, self._handles)
            if message is not None:
                self._route(message)
        self._pubsub.close()

    def _next_message(self) -> dict | None:
        busy = self._sharded and (self._handles or not self._subscribe_queue.empty() or self._shard_changes)
        wait_s = self.BUSY_WAIT_S if busy else self.IDLE_WAIT_S
        if self._sharded and not self._pubsub.shard_channels:
            # Nothing to read (ClusterPubSub would take an empty read for a lost topology).
            time.sleep(wait_s)
            return None
        if self._sharded:
            # A node that failed or gave its slots away is ClusterPubSub's to repair; it raises
            # only when no node could be read, and its resubscriptions come back as SSUBSCRIBE
            # confirmations nobody waited for, on which the request reads what it missed.
            return self._pubsub.get_sharded_message(timeout=wait_s)
        return self._pubsub.get_message(timeout=wait_s)

    def _move_subscription(self) -> None:
        """Subscribe on another cluster node what the failed one carried. A cluster's PUBLISH
        reaches every node, so any node will do; what was published meanwhile is looked up by
        the recheck a reconnect triggers."""
        patterns, channels = self._moving
        old = self._pubsub
        self._pubsub = Subscription(pubsub_pool(self._client, avoid=old.connection_pool),
                                    ignore_subscribe_messages=False)
        try:
            old.close()
        except (redis.RedisError, OSError):
            pass
        if patterns:
            self._pubsub.psubscribe(*patterns)
        if channels:
            self._pubsub.subscribe(*channels)
        self._pubsub.reconnected = True
        self._moving = None
        log.warning("pub/sub moved to cluster node %s:%s", self._pubsub.connection_pool.connection_kwargs.get("host"),
                    self._pubsub.connection_pool.connection_kwargs.get("port"))

    def _renew_shard_subscriptions(self) -> None:
        """AsyncClient._renew_shard_subscriptions: a fresh sharded subscription, with every
        channel of the old one and every one still waiting for its confirmation (each keeps
        its waiter)."""
        self._renew = False
        old = self._pubsub
        channels = self._routes.still_wanted([*old.shard_channels, *self._confirm], self._handles, self._confirm)
        self._pubsub = self._client.pubsub()
        try:
            old.close()
        except (redis.RedisError, OSError):
            pass
        relearn_slots(self._client)
        for channel in channels:
            self._subscribe_queue.put((channel, self._confirm.get(channel) or threading.Event()))
        log.warning("renewed the sharded subscription of %d channels (one was not confirmed in 2 s)", len(channels))

    def _queued_changes(self) -> Iterator[tuple[str, threading.Event]]:
        """What other threads queued (channel, or "-channel" to unsubscribe), until none is left."""
        while True:
            try:
                yield self._subscribe_queue.get_nowait()
            except queue.Empty:
                return

    def _drain_subscribe_queue(self) -> None:
        if self._sharded:
            self._change_shard_subscriptions()
            return
        for channel, done in self._queued_changes():
            if channel.startswith("-"):
                self._pubsub.unsubscribe(channel[1:])
                continue
            self._confirm[channel] = done
            try:
                self._pubsub.subscribe(channel)
            except (*CONNECTION_LOST, OSError):
                self._subscribe_queue.put((channel, done))  # again once the connection is back
                raise

    def _change_shard_subscriptions(self) -> None:
        """Send the queued shard-channel changes, each to the master of its slot; those whose
        master cannot be reached are held back while the others go out, and events are read
        meanwhile (core.ShardChanges)."""
        queued = []
        for channel, done in self._queued_changes():
            if channel.startswith("-"):
                queued.append((False, channel[1:]))
                self._confirm.pop(channel[1:], None)  # its request is gone
            else:
                queued.append((True, channel))
                self._confirm[channel] = done
        now = time.monotonic()
        sending = self._shard_changes.begin(now, queued, lambda channel: node_of(self._client, channel))
        for subscribe, channel in sending:
            try:
                (self._pubsub.ssubscribe if subscribe else self._pubsub.sunsubscribe)(channel)
            except (redis.RedisError, OSError) as exc:
                sending.fail(exc)
        failure = self._shard_changes.end(sending, now)
        if failure is not None:
            log.warning("could not change %d shard-channel subscription(s) (%s); trying again shortly",
                        len(sending.failed), failure)
            relearn_slots(self._client)  # a failed master's slots go to its successor

    def _route(self, message: dict) -> None:
        done = self._routes.route(message, self._handles, self._confirm)
        if done is not None:
            done.set()


class Client(core.ClientCore[RequestHandle]):
    """Submit generation requests to batchd and read their results.

    `Client(url)` connects to Redis (default `$BATCHD_REDIS_URL`, then
    redis://127.0.0.1:6379/0; `rediss://` for TLS, user:password@ for ACL,
    `redis+sentinel://host:port[,host:port...]/service` for a Sentinel-managed master,
    followed through failovers). durable_replicas=N: a submit returns only once N replicas
    acknowledged it (WAIT), retried within the retry budget, else BrokerUnavailable.
    Only a client holding a request's cancel key can cancel it: each Client draws its own,
    unless given cancel_key (shared by processes that cancel each other's requests by id).
    tenant: the request stream to submit to, and the namespace of request ids (`<tenant>/...`);
    default: the Redis ACL user of the URL, which docs/security.md lets XADD only there; the
    unauthenticated user (and tenant="") submits to the shared stream.
    """

    def __init__(self, url: str | None = None, *, prefix: str = "batchd:", producer: str | None = None,
                 max_connections: int = 64, socket_timeout: float = 30.0, cancel_key: str | bytes | None = None,
                 durable_replicas: int = 0, tenant: str | None = None, shards: int | None = None):
        self._redis = open_redis(
            url, wait_for_connection=True, max_connections=max_connections, socket_timeout=socket_timeout,
            socket_connect_timeout=10.0, health_check_interval=30,
            retry_on_timeout=True)
        super().__init__(prefix, producer, cancel_key, durable_replicas,
                         core.resolve_tenant(tenant, acl_user(self._redis)), shards, is_cluster(self._redis))
        try:
            core.check_fleet_shards(fleet_shards(self._redis, self.keys), self.keys.shards)
        except WrongShards:
            close_redis(self._redis)  # a cluster client's node connections too
            raise
        pattern = None if self.keys.shard_channels else self.keys.channel_pattern(self._ids.id_prefix)
        self._router = _Router(self._redis, self._routes, pattern)
        self._router.start()

    # -- public API (submit: core.ClientCore) -----------------------------------------
    def generate(self, prompt: str | None = None, **kwargs) -> Result:
        """Submit and wait for the final result (see submit for the arguments)."""
        return self.submit(prompt, **kwargs).result()

    def stream(self, prompt: str | None = None, **kwargs) -> Iterator[core.StreamItem]:
        """Submit and yield Delta items as tokens arrive, then the final Result."""
        return iter(self.submit(prompt, **kwargs))

    def next_token_logprobs(self, prompt_token_ids: Sequence[int], top_k: int | None = None,
                            timeout: float | None = None, model: str | None = None,
                            logprobs_dtype: str = "float32", prefix_pin: str | None = None) -> scoring.NextTokenLogprobs:
        """Log-probabilities of the token after the prompt: the full vector, or the top_k most likely.
        logprobs_dtype "float16" halves the full vector on the wire and in Redis (docs/integrations.md).
        prefix_pin: a pin's handle (pin()); the prompt is its tokens, then prompt_token_ids (may be
        empty). A pin that expired or was unpinned raises UnknownPrefix: send the whole prompt."""
        request_id = self._ids.next()
        request, payload = scoring.next_token_request(request_id, prompt_token_ids, top_k,
                                                      producer=self.producer, timeout=timeout, model=model,
                                                      logprobs_dtype=logprobs_dtype, prefix_pin=prefix_pin,
                                                      **self._secrets(request_id))
        return scoring.next_token_logprobs(self._send(request, payload, False, timeout).result())

    def next_token_logprobs_rows(self, rows: Sequence[Sequence[int]], prompt_token_ids: Sequence[int] = (), *,
                                 prefix_pin: str | None = None, top_k: int | None = None,
                                 timeout: float | None = None, model: str | None = None,
                                 logprobs_dtype: str = "float32") -> scoring.NextTokenLogprobsRows:
        """The next-token distribution after each row (up to 256), every row following one prompt
        (prefix_pin's tokens, then prompt_token_ids), in one request: an SMC step's particles
        send their shared prompt once. The answer's array() has one row per row; with top_k,
        its top_token_ids / top_logprobs hold each row's k most likely tokens instead."""
        request_id = self._ids.next()
        request, payload = scoring.next_token_request(request_id, prompt_token_ids, top_k,
                                                      producer=self.producer, timeout=timeout, model=model,
                                                      logprobs_dtype=logprobs_dtype, prefix_pin=prefix_pin,
                                                      rows=rows, **self._secrets(request_id))
        return scoring.NextTokenLogprobsRows(len(rows), self._send(request, payload, False, timeout).result())

    def pin(self, token_ids: Sequence[int], ttl_s: int = 600, *, model: str | None = None,
            timeout: float | None = None) -> scoring.Pin:
        """Keep this token prefix resident in the KV cache of the workers serving model, for ttl_s
        seconds unless renewed or unpinned first; requests name it by the returned Pin's handle
        (prefix_pin=). Raises PinLimitReached when the worker keeps as many pinned blocks as it may
        (docs/integrations.md, "Pinned prefixes")."""
        request_id = self._ids.next()
        request, payload = scoring.pin_request(request_id, token_ids, producer=self.producer, timeout=timeout,
                                               model=model, ttl_s=ttl_s, **self._secrets(request_id))
        return scoring.pin(self._send(request, payload, False, timeout).result(), ttl_s)

    def renew_pin(self, handle: str, ttl_s: int = 600, *, model: str | None = None,
                  timeout: float | None = None) -> scoring.Pin:
        """Keep a pin for ttl_s more seconds from now; UnknownPrefix if it is gone already."""
        request_id = self._ids.next()
        request, payload = scoring.pin_request(request_id, None, producer=self.producer, timeout=timeout,
                                               model=model, ttl_s=ttl_s, handle=handle, **self._secrets(request_id))
        return scoring.pin(self._send(request, payload, False, timeout).result(), ttl_s)

    def unpin(self, handle: str, *, model: str | None = None, timeout: float | None = None) -> None:
        """Let a pin go: every worker drops its blocks within a heartbeat interval."""
        request_id = self._ids.next()
        request, payload = scoring.unpin_request(request_id, handle, producer=self.producer, timeout=timeout,
                                                 model=model, **self._secrets(request_id))
        self._send(request, payload, False, timeout).result()

    def score(self, prompt: str | None = None, continuation: str | None = None, *,
              prompt_token_ids: Sequence[int] | None = None, continuation_token_ids: Sequence[int] | None = None,
              timeout: float | None = None, model: str | None = None,
              messages: Sequence[dict] | None = None) -> scoring.Score:
        """Log-probability of the continuation after the prompt (text, chat messages or token ids),
        token by token."""
        request_id = self._ids.next()
        request, payload = scoring.score_request(request_id, prompt, continuation, prompt_token_ids,
                                                 continuation_token_ids, producer=self.producer, timeout=timeout,
                                                 model=model, messages=messages, **self._secrets(request_id))
        return scoring.score(self._send(request, payload, False, timeout).result())

    def models(self) -> list[str]:
        """The model names live workers serve, sorted: what `model=` may name. Reads the workers'
        heartbeats (`batchd:workers`, `batchd:worker:*`), which docs/security.md's producer
        role does not grant: such a user gets BrokerUnavailable."""
        def read() -> list[str]:
            worker_ids = self._redis.zrange(self.keys.workers, 0, -1)
            beats = self._redis.mget([self.keys.heartbeat(w.decode()) for w in worker_ids]) if worker_ids else []
            return core.served_models(beats)

        return _retrying(read, "listing the models served")

    def served_tokenizer(self, model: str | None = None) -> tokenizers.ServedTokenizer:
        """The tokenizer the workers serving model use (None: the fleet's only model), as they
        store it in Redis: its TokenizerInfo and its files, which Hugging Face's AutoTokenizer
        loads (ServedTokenizer.save; batchd.integrations.hf_tokenizer does it)."""
        name = model or tokenizers.the_only_model(self.models())
        info, files = _retrying(lambda: self._redis.hmget(self.keys.tokenizer(name), ["info", "files"]),
                                f"reading the tokenizer of {name}")
        return tokenizers.stored_tokenizer(info, files, name)

    def tokenizer_info(self, model: str | None = None) -> TokenizerInfo:
        """Hash, vocabulary size and special ids of the tokenizer served for model."""
        name = model or tokenizers.the_only_model(self.models())
        info = _retrying(lambda: self._redis.hget(self.keys.tokenizer(name), "info"),
                         f"reading the tokenizer of {name}")
        return tokenizers.stored_info(info, name)

    def check_tokenizer(self, tokenizer: Any, model: str | None = None) -> None:
        """Raise TokenizerMismatch unless tokenizer is the one served for model: token ids a
        caller computes with it mean the tokens it thinks they do."""
        name = model or tokenizers.the_only_model(self.models())
        tokenizers.check(tokenizer, self.tokenizer_info(name), name)

    def cancel(self, request_id: str) -> None:
        """Ask batchd to stop a request; its slot is freed within one engine step."""
        request_id = tenant_id(self.tenant, request_id)

        def send() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                core.queue_cancel(pipe, self.keys, request_id, self._cancel_secrets.secret(request_id))
                pipe.execute()

        _retrying(send, f"cancel of {request_id}")

    def fetch_result(self, request_id: str) -> Result | None:
        """The stored final result of any request id (one without a namespace: this client's
        tenant's), or None if not finished."""
        request_id = tenant_id(self.tenant, request_id)
        stored = self._stored_result(request_id)
        if stored is None:
            return None
        parser = core.EventParser(request_id)
        parser.parse(stored)
        return parser.result

    def close(self) -> None:
        self._router.stop()
        self._router.join(timeout=2)
        close_redis(self._redis)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------
    def _send(self, request: Request, payload: bytes, explicit: bool, timeout: float | None) -> RequestHandle:
        if not self._router.ready.wait(core.RETRY_BUDGET_S):
            raise BrokerUnavailable(f"could not subscribe for results of {request.id}: Redis unreachable for "
                                    f"{core.RETRY_BUDGET_S:.0f} s; check the URL and that Redis is up", request.id)
        handle = RequestHandle(self, self._reading(request, timeout))
        self._router.register(handle)
        if self._needs_own_subscription(request.id, explicit):
            self._router.subscribe(self.keys.channel(request.id))
        script, keys, args = self._submit_call(request, payload)
        try:
            outcome = _retrying(lambda: self._submit(script, keys, args, request.id), f"submit of {request.id}")
        except BaseException:
            self._forget(request.id)
            raise
        if outcome == -1:
            self._forget(request.id)
            raise self._overloaded(request.id)
        return handle

    def _submit(self, script, keys, args, request_id: str) -> int:
        if not self.durable_replicas:
            return script.run(self._redis, keys, args)
        # One pipeline, so WAIT runs on the connection that made the write it waits for (on a
        # cluster, a connection to the master of the request's shard).
        target = master_client(self._redis, keys[0]) if is_cluster(self._redis) else self._redis
        try:
            with target.pipeline(transaction=False) as pipe:
                script.queue(pipe, keys, args)
                pipe.wait(self.durable_replicas, core.DURABLE_WAIT_MS)
                outcome, acknowledged = pipe.execute(raise_on_error=False)
        except CONNECTION_LOST:
            if target is not self._redis:
                relearn_slots(self._redis)  # the master died: the retry finds its successor
            raise
        if is_moved(outcome):
            relearn_slots(self._redis)  # the slot moved: learn where, and try again
        return core.durable_outcomes([outcome], acknowledged, self.durable_replicas, f"submit of {request_id}")[0]

    def _stored_result(self, request_id: str) -> bytes | None:
        try:
            return self._redis.get(self.keys.result(request_id))
        except CONNECTION_LOST:
            return None

    def _abandon(self, request_id: str) -> None:
        """The caller stopped reading a stream before its end: free the slot for someone else."""
        try:
            self.cancel(request_id)
        except BrokerUnavailable as exc:
            log.warning("could not cancel abandoned request %s: %s", request_id, exc)

    def _forget(self, request_id: str) -> None:
        own = self._needs_own_subscription(request_id, explicit=True)
        self._router.forget(request_id, self.keys.channel(request_id) if own else None)
