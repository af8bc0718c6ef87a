"""`batchd gateway`: an OpenAI-compatible HTTP server in front of the request queue.

A Starlette app on uvicorn that turns each /v1/chat/completions and
/v1/completions call into batchd requests through AsyncClient, and their
results back into OpenAI's shapes (cli/openai_api.py does the translation).
It holds no state beyond the calls in flight, so any number run behind a load
balancer. An API key maps to a producer identity (one AsyncClient each, so fair
share and tenancy see who asked); with no key configured it serves loopback only.
A caller that disconnects cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import NoPermissionError, RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from batchd.client import AsyncClient, BatchdError
from batchd.client.core import Delta, StreamRestarted, default_producer
from batchd.client.errors import BrokerUnavailable, UnknownModel
from batchd.client.protocol import Result
from batchd.daemon import metrics

from . import openai_api as api

log = logging.getLogger("batchd.gateway")

# /v1/models and the early unknown-model check re-read the fleet's heartbeats at most this often.
MODELS_TTL_S = 1.0
_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class GatewayConfig:
    redis_url: str
    prefix: str = "batchd:"
    shards: int = 1
    # sha256(key) -> (producer identity, Redis URL of that producer or None: redis_url)
    api_keys: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # A request's deadline when the call gives none: past it the caller gets a 504.
    request_timeout_s: float = 600.0
    # Submits return only once this many replicas hold them (AsyncClient durable_replicas).
    durable_replicas: int = 0
    # /metrics on the API's port too (False when --metrics-port gives it a port of its own,
    # so callers holding a key do not read every key's traffic).
    metrics_on_api_port: bool = True

    def describe(self) -> str:
        from batchd.client.connection import describe

        producers = sorted({producer for producer, _ in self.api_keys.values()})
        return (f"redis={describe(self.redis_url)} prefix={self.prefix} api_keys={len(self.api_keys)} "
                f"producers={','.join(producers) or '-'} request_timeout_s={self.request_timeout_s} "
                f"durable_replicas={self.durable_replicas}")


def key_digest(key: str) -> str:
    """Keys are held and compared as digests: no key text in memory dumps, no timing on its prefix."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: str) -> dict[str, tuple[str, str | None]]:
    """A keys file: one `KEY PRODUCER [REDIS_URL]` a line (# comments). A key of its own Redis URL
    lets each producer connect as its own Redis ACL user."""
    keys = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3):
            raise ValueError(f"{path}:{number}: expected 'KEY PRODUCER [REDIS_URL]', got {len(words)} words")
        keys[key_digest(words[0])] = (words[1], words[2] if len(words) == 3 else None)
    return keys


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_json.encode(body), status_code=status, headers=headers, media_type="application/json")


def _error_response(error: BaseException) -> Response:
    if isinstance(error, HTTPError):
        return _json_response(api.error_body(error.status, error.message, error.code), error.status, error.headers)
    if isinstance(error, RedisError):
        return _json_response(api.error_body(503, f"batchd's Redis is unreachable: {error}", "redis_unavailable"), 503)
    status, body, headers = api.error_of(error)
    return _json_response(body, status, headers)


class Gateway:
    """The app's state: one AsyncClient per producer identity, and a short-lived view of the models served."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self._clients: dict[str, AsyncClient] = {}
        # Reads the fleet's heartbeats through --redis, whose user may read more than a key's
        # producer user (docs/security.md's producer role cannot); never submits, so never subscribes.
        self._fleet: AsyncClient | None = None
        self._models: list[str] = []
        self._models_read_at = 0.0
        # The read of the models served in flight, which every caller finding the view stale
        # awaits: a burst arriving just then makes one read, not one each (the fleet client
        # has 4 connections, and one read each ran out of them: "Too many connections").
        self._models_reading: asyncio.Future | None = None
        # Cancels sent for callers that went away: run on their own, as the caller's task is cancelled.
        self._cancelling: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        identities = {(producer, url) for producer, url in self.config.api_keys.values()} or {(None, None)}
        for producer, url in identities:
            client = AsyncClient(url or self.config.redis_url, prefix=self.config.prefix, shards=self.config.shards,
                                 producer=producer or f"gateway:{default_producer()}",
                                 durable_replicas=self.config.durable_replicas)
            await client.__aenter__()
            self._clients[producer or ""] = client
        self._fleet = AsyncClient(self.config.redis_url, prefix=self.config.prefix, shards=self.config.shards, max_connections=4)
        log.info("gateway ready: %s", self.config.describe())

    async def stop(self) -> None:
        for client in [*self._clients.values(), self._fleet]:
            if client is not None:
                await client.close()

    def client_for(self, request: Request) -> AsyncClient:
        """The caller's producer identity from its API key; without configured keys, loopback callers only."""
        if not self.config.api_keys:
            if not is_loopback(request.client.host if request.client else None):
                raise HTTPError(403, "this gateway has no API keys and serves loopback only", "forbidden")
            return self._clients[""]
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        found = self.config.api_keys.get(key_digest(key.strip())) if scheme.lower() == "bearer" else None
        if found is None:
            raise HTTPError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        return self._clients[found[0]]

    async def models(self, fresh: bool = False) -> list[str]:
        """The models served, read at most once a second (fresh: now), one read at a time."""
        if fresh or time.monotonic() - self._models_read_at > MODELS_TTL_S:
            if self._models_reading is None:
                self._models_reading = asyncio.ensure_future(self._read_models())
                self._models_reading.add_done_callback(self._read_done)
            # Shielded: a caller that goes away (its task cancelled) leaves the read to the others.
            await asyncio.shield(self._models_reading)
        return self._models

    async def _read_models(self) -> None:
        began = time.monotonic()
        try:
            self._models = await self._fleet.models()
        except BrokerUnavailable as exc:
            if not isinstance(exc.__cause__, NoPermissionError):
                raise
            # A Redis user without read access to the heartbeats: the gateway cannot list
            # models nor refuse unknown ones early; the schedulers still refuse them.
            log.warning("cannot read the workers' heartbeats (%s); /v1/models will be empty", exc.message)
            self._models = []
        self._models_read_at = began

    def _read_done(self, reading: asyncio.Future) -> None:
        self._models_reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved here: every caller that awaited it got it raised

    def served_now(self) -> list[str]:
        """The models served at the last read (no I/O)."""
        return self._models

    async def resolve_model(self, requested: str) -> str:
        """The model a call is answered by, as it will be named in the response. A model no live
        worker serves is refused here without a round trip through a scheduler; the scheduler
        decides when no worker is live yet."""
        served = await self.models()
        if requested and served and requested not in served:
            served = await self.models(fresh=True)
        if not served:
            return requested
        if not requested:
            if len(served) == 1:
                return served[0]
            raise UnknownModel(f"this fleet serves {len(served)} models ({', '.join(served)}): name one as model")
        if requested not in served:
            raise UnknownModel(f"no live worker serves model {requested!r}; the models served are: {', '.join(served)}")
        return requested

    def cancel_later(self, client: AsyncClient, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(client.cancel(request_id))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)


@dataclass
class Call:
    """One HTTP call: its endpoint, model and the batchd requests it became (one per choice)."""

    endpoint: str
    model: str
    client: AsyncClient
    submits: list[dict]
    include_usage: bool = False
    # Alternatives each token's logprob comes with (openai_api.logprobs_asked); None: no logprobs.
    logprobs: int | None = None
    timeout: float | None = None
    handles: list = field(default_factory=list)
    results: list[Result | None] = field(default_factory=list)

    async def submit_all(self, gateway: "Gateway", timeout: float) -> None:
        """Submit every choice's request at once (one pipeline); if any is refused, none runs."""
        self.timeout = timeout
        outcomes = await asyncio.gather(*(self.client.submit(timeout=timeout, model=self.model or None, **kwargs)
                                          for kwargs in self.submits), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        if refused:
            for handle in outcomes:
                if not isinstance(handle, BaseException):
                    gateway.cancel_later(self.client, handle.request_id)
            raise refused[0]
        self.handles = list(outcomes)
        self.results = [None] * len(self.handles)

    def cancel_unfinished(self, gateway: Gateway) -> None:
        unfinished = [h.request_id for h, r in zip(self.handles, self.results) if r is None]
        for request_id in unfinished:
            gateway.cancel_later(self.client, request_id)
        if unfinished:
            label = self.model if self.model in gateway.served_now() else "-"
            metrics.gateway_disconnects.labels(self.endpoint, label).inc()


def build_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)

    async def chat_completions(request: Request) -> Response:
        return await _complete(gateway, request, "chat")

    async def completions(request: Request) -> Response:
        return await _complete(gateway, request, "completions")

    async def list_models(request: Request) -> Response:
        try:
            gateway.client_for(request)
            served = await gateway.models(fresh=True)
        except Exception as exc:
            return _error_response(exc)
        return _json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "batchd"} for name in served]})

    async def health(request: Request) -> Response:
        try:
            served = await gateway.models(fresh=True)
        except (RedisError, BrokerUnavailable) as exc:
            return _json_response({"status": "unhealthy", "error": f"Redis: {exc}"}, 503)
        return _json_response({"status": "ok", "models": served})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.GATEWAY_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", list_models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    if config.metrics_on_api_port:
        routes.append(Route("/metrics", prometheus, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app


async def _complete(gateway: Gateway, request: Request, endpoint: api.Endpoint) -> Response:
    started = time.perf_counter()
    model = "-"
    metrics.gateway_in_flight.inc()
    try:
        client = gateway.client_for(request)
        body = await request.body()
        if endpoint == "chat":
            parsed = api.parse_chat(body)
            base = dict(messages=api.chat_messages(parsed),
                        **api.sampling(parsed, parsed.max_completion_tokens or parsed.max_tokens))
            prompts = [base]
        else:
            parsed = api.parse_completion(body)
            base = api.sampling(parsed, parsed.max_tokens)
            prompts = [{**prompt, **base} for prompt in api.completion_prompts(parsed)]
        model = await gateway.resolve_model(parsed.model)
        submits = [{**prompt, "seed": api.choice_seed(prompt["seed"], i)}
                   for prompt in prompts for i in range(parsed.n)]
        call = Call(endpoint, model, client, submits,
                    include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
                    logprobs=api.logprobs_asked(parsed))
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        await call.submit_all(gateway, gateway.config.request_timeout_s)
        response_id = prefix + call.handles[0].request_id
        if parsed.stream:
            response = await _stream(gateway, call, api.Chunks(response_id, model, endpoint == "chat", call.logprobs))
        else:
            response = await _whole(gateway, call, request, response_id)
    except Exception as exc:
        if not isinstance(exc, (BatchdError, HTTPError, RedisError)):
            log.exception("gateway call failed")
        response = _error_response(exc)
    finally:
        metrics.gateway_in_flight.dec()
    # A label only for models served: a caller's made-up names must not grow the series.
    label = model if model in gateway.served_now() else "-"
    metrics.gateway_requests.labels(endpoint, label, str(response.status_code)).inc()
    metrics.gateway_duration.labels(endpoint, label).observe(time.perf_counter() - started)
    return response


async def _whole(gateway: Gateway, call: Call, request: Request, response_id: str) -> Response:
    """Wait for every choice's result, or for the caller to go away (then cancel them)."""
    if len(call.handles) == 1:  # the common case, without gather's extra future
        results = asyncio.ensure_future(_one_result(call.handles[0]))
    else:
        results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in call.handles)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((results, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        call.cancel_unfinished(gateway)
        raise
    finally:
        gone.cancel()
    if not results.done():
        results.cancel()
        call.cancel_unfinished(gateway)
        return Response(status_code=499)
    call.results = [api.check_finished(r) for r in results.result()]
    logprobs = None
    if call.logprobs is not None:
        logprobs = [api.choice_logprobs(call.endpoint == "chat", r, call.logprobs) for r in call.results]
    build = api.chat_completion if call.endpoint == "chat" else api.text_completion
    return _json_response(build(response_id, call.model, call.results, logprobs))


async def _one_result(handle) -> list[Result]:
    return [await handle.result()]


async def _disconnected(request: Request) -> None:
    """Returns once the caller closed its connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stream(gateway: Gateway, call: Call, chunks: api.Chunks) -> Response:
    """Server-sent events: one chunk per delta of each choice, a last chunk per choice with its
    finish_reason, the usage chunk if asked for, then [DONE]. The first event is awaited before
    the response starts, so an error that comes first (an unknown model, a request too long for
    the worker) is still an HTTP status."""
    events = _merge(call) if len(call.handles) > 1 else _events(call, 0)
    try:
        first = await events.__anext__()
    except BaseException:
        call.cancel_unfinished(gateway)
        raise
    return StreamingResponse(_sse(gateway, call, chunks, first, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(gateway: Gateway, call: Call, chunks: api.Chunks, first, events) -> AsyncIterator[bytes]:
    try:
        if chunks.chat:
            for index in range(len(call.handles)):
                yield _event(chunks.role(index))
        item = first
        while item is not None:
            yield _event(_chunk_of(chunks, *item))
            item = await anext_or_none(events)
        if call.include_usage:
            yield _event(chunks.usage([r for r in call.results if r is not None]))
    except BatchdError as exc:  # after the response started: OpenAI's error object as an event
        yield _event(api.error_of(exc)[1])
    finally:
        # Starlette cancels this generator when the caller disconnects.
        call.cancel_unfinished(gateway)
    yield b"data: [DONE]\n\n"


def _chunk_of(chunks: api.Chunks, index: int, item) -> dict:
    if isinstance(item, Result):
        return chunks.text(index, "", api.finish_reason(item))
    return chunks.text(index, item.text, logprobs=item.logprobs)


def _event(payload: dict) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


async def anext_or_none(events):
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _events(call: Call, index: int) -> AsyncIterator[tuple[int, object]]:
    """One choice's stream items as (index, Delta or Result); a restart that decodes differently
    cannot be unsent over SSE, so it ends the choice with an error."""
    async for item in call.handles[index]:
        if isinstance(item, StreamRestarted):
            raise BatchdError(f"the worker running this request died (attempt {item.attempt}) and the retry "
                              "decoded differently; retry the call")
        if isinstance(item, Result):
            call.results[index] = api.check_finished(item)
        if isinstance(item, (Delta, Result)):
            yield index, item


async def _merge(call: Call) -> AsyncIterator[tuple[int, object]]:
    """Every choice's items, as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int) -> None:
        try:
            async for item in _events(call, index):
                await queue.put(item)
            await queue.put(done)
        except BaseException as exc:
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(call.handles))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def serve(config: GatewayConfig, host: str, port: int) -> None:
    import uvicorn

    sock = listening_socket(host, port)
    log.info("gateway listening on http://%s:%d", host, port)
    server = uvicorn.Server(uvicorn.Config(build_app(config), host=host, port=port, log_level="warning",
                                          access_log=False, loop="auto", http="auto", lifespan="on"))
    server.run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """The gateway's socket, bound here rather than by uvicorn, which logs a taken port as an
    error and exits 1: a taken port is CannotListen, one line from the command."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise metrics.cannot_listen(host, port, "the gateway", "--port", exc) from None
    sock.listen(2048)  # uvicorn's own backlog
    return sock

