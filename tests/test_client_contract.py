"""Client and AsyncClient keep one contract: every case here runs against both, on a real redis-server.

The async client runs on an event loop in a helper thread, behind the same
blocking calls the sync one offers, so each case is written once.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import redis

from batchd import AsyncClient, Client, Delta, InvalidRequest, Overloaded, Result
from batchd.client.keys import Keys
from batchd.client.protocol import decode_request, seal_final

# Requests under this prefix reach no scheduler: what the client sent stays where it put it.
IDLE = Keys("contract-idle:")


class SyncDriver:
    def __init__(self, url: str, prefix: str):
        self.client = Client(url, prefix=prefix)

    def submit(self, prompt: str, **options):
        return self.client.submit(prompt, **options)

    def result(self, handle) -> Result:
        return handle.result()

    def stream(self, prompt: str, **options) -> list:
        return list(self.client.stream(prompt, **options))

    def next_token_logprobs(self, prompt_token_ids: list[int], **options):
        return self.client.next_token_logprobs(prompt_token_ids, **options)

    def cancel(self, request_id: str) -> None:
        self.client.cancel(request_id)

    def close(self) -> None:
        self.client.close()


class AsyncDriver:
    """AsyncClient on its own event loop, called through the blocking methods SyncDriver has."""

    def __init__(self, url: str, prefix: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> AsyncClient:
            client = AsyncClient(url, prefix=prefix)
            await client.__aenter__()
            return client

        self.client = self._run(start())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def submit(self, prompt: str, **options):
        async def submit():
            return await self.client.submit(prompt, **options)

        return self._run(submit())

    def result(self, handle) -> Result:
        return self._run(handle.result())

    def stream(self, prompt: str, **options) -> list:
        async def stream():
            return [item async for item in self.client.stream(prompt, **options)]

        return self._run(stream())

    def next_token_logprobs(self, prompt_token_ids: list[int], **options):
        return self._run(self.client.next_token_logprobs(prompt_token_ids, **options))

    def cancel(self, request_id: str) -> None:
        self._run(self.client.cancel(request_id))

    def close(self) -> None:
        self._run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


DRIVERS = {"Client": SyncDriver, "AsyncClient": AsyncDriver}


@pytest.fixture(params=list(DRIVERS))
def producer(request):
    """A driver factory for one client kind; every driver it makes is closed afterwards."""
    made = []

    def make(url: str, prefix: str = "batchd:"):
        made.append(DRIVERS[request.param](url, prefix))
        return made[-1]

    yield make
    for driver in made:
        driver.close()


def test_generate_returns_the_answer_and_its_usage(echo_fleet, producer):
    client = producer(echo_fleet.url)
    result = client.result(client.submit("hello contract", max_new_tokens=64, timeout=30))
    assert (result.text, result.finish_reason) == ("hello contract", "stop")
    assert result.usage.completion_tokens == len("hello contract")


def test_stream_yields_deltas_in_order_then_the_result(echo_fleet, producer):
    items = producer(echo_fleet.url).stream("streamed", max_new_tokens=64, timeout=30)
    assert isinstance(items[-1], Result) and all(isinstance(item, Delta) for item in items[:-1])
    assert "".join(item.text for item in items[:-1]) == items[-1].text == "streamed"
    assert [item.index for item in items[:-1]] == sorted(item.index for item in items[:-1])


def test_a_request_id_submitted_twice_runs_once(echo_fleet, producer, request):
    client = producer(echo_fleet.url)
    stats = redis.Redis.from_url(echo_fleet.url)
    before = int(stats.hget(Keys().stats, "requests_dispatched") or 0)
    request_id = f"contract-twice-{request.node.callspec.id}"
    first = client.result(client.submit("once", request_id=request_id, timeout=30))
    again = client.result(client.submit("once", request_id=request_id, timeout=30))
    assert first.text == again.text == "once"
    assert int(stats.hget(Keys().stats, "requests_dispatched")) - before == 1


def test_bad_arguments_fail_at_the_call(echo_fleet, producer):
    client = producer(echo_fleet.url)
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        client.submit("x", max_new_tokens=0)
    with pytest.raises(InvalidRequest):
        client.submit("x", request_id="spaces are not allowed")


def test_a_request_the_worker_cannot_serve_raises_its_typed_error(echo_fleet, producer):
    with pytest.raises(InvalidRequest, match="no model"):
        producer(echo_fleet.url).next_token_logprobs([1, 2, 3], timeout=30)


def test_submit_sends_the_request_a_producer_in_any_language_would(redis_client, redis_server, producer):
    client = producer(redis_server.url, IDLE.prefix)
    handle = client.submit("on the wire", max_new_tokens=7, priority=3, request_id="wire-1")
    [(_stream, [(_entry_id, fields)])] = redis_client.xread({IDLE.requests: "0"})
    request = msgpack.unpackb(fields[b"data"])  # an independent decoder
    assert fields[b"id"] == b"wire-1" and handle.request_id == "wire-1"
    assert (request["id"], request["prompt"], request["params"]["max_new_tokens"], request["priority"]) == (
        "wire-1", "on the wire", 7, 3)
    # The id's claim is the schedulers' to write (daemon/scripts.py CLAIM), never a producer's.
    assert not redis_client.exists(IDLE.accepted("wire-1"))


def test_a_full_queue_is_overloaded(redis_client, redis_server, producer):
    redis_client.hset(IDLE.config, "max_queue", 1)
    redis_client.xadd(IDLE.requests, {"id": "queued", "data": b""})
    with pytest.raises(Overloaded, match="full"):
        producer(redis_server.url, IDLE.prefix).submit("one too many")


def test_cancel_sets_the_flag_then_broadcasts_the_id(redis_client, redis_server, producer):
    listener = redis_client.pubsub()
    listener.subscribe(IDLE.cancel_channel)
    listener.get_message(timeout=1)
    producer(redis_server.url, IDLE.prefix).cancel("to-cancel")
    message = listener.get_message(timeout=5)
    # The id and the request's cancel secret, which hashes to the request's cancel_hash.
    request_id, _, secret = message["data"].decode().partition(" ")
    assert request_id == "to-cancel" and len(secret) == 32
    assert redis_client.get(IDLE.cancelled("to-cancel")).decode() == secret
    assert redis_client.ttl(IDLE.cancelled("to-cancel")) > 3600


def test_a_result_stored_while_the_subscription_was_down_is_read_after_the_reconnect(
        redis_client, redis_server, producer):
    client = producer(redis_server.url, IDLE.prefix)
    handle = client.submit("never dispatched", timeout=30)
    time.sleep(0.2)
    redis_client.client_kill_filter(_type="pubsub")
    # The worker's publish went nowhere (no subscriber); only the stored result remains,
    # sealed as a worker seals it (with the request's event_key).
    [(_entry, fields)] = redis_client.xrange(IDLE.requests)
    result = Result(handle.request_id, "stop", text="stored meanwhile")
    redis_client.set(IDLE.result(handle.request_id), seal_final(result, decode_request(fields[b"data"])))
    started = time.monotonic()
    assert client.result(handle).text == "stored meanwhile"
    # Read because the subscription came back, not at the next poll (RESULT_POLL_S, 2 s) .
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("command", ["submit", "cancel"])
def test_submit_and_cancel_ride_out_a_redis_restart(redis_server, producer, command):
    client = producer(redis_server.url, IDLE.prefix)
    redis_server.stop(kill=True)
    restart = threading.Timer(1.0, redis_server.start)
    restart.start()
    try:
        if command == "submit":
            client.submit("after the restart", request_id="restarted")
        else:
            client.cancel("restarted")
    finally:
        restart.join()
    after = redis.Redis.from_url(redis_server.url)
    if command == "submit":
        [(_stream, entries)] = after.xread({IDLE.requests: "0"})
        assert {fields[b"id"] for _entry, fields in entries} == {b"restarted"}
    else:
        assert after.exists(IDLE.cancelled("restarted"))


def test_a_client_submits_as_its_acl_user_unless_told_otherwise():
    """docs/protocol.md, "Tenants": the unauthenticated user keeps the shared stream."""
    from batchd.client.core import resolve_tenant

    assert resolve_tenant(None, "alice") == "alice"
    assert resolve_tenant(None, None) == resolve_tenant(None, "default") == ""
    assert resolve_tenant("", "alice") == "" and resolve_tenant("bob", "alice") == "bob"
    for bad in ("a/b", "a:b", "x" * 65):
        with pytest.raises(InvalidRequest, match="tenant"):
            resolve_tenant(bad, None)


def test_a_burst_larger_than_the_pool_waits_for_connections_instead_of_failing(redis_server, caplog):
    """More calls at once than a client's max_connections (threads sharing a Client, a gather
    on an AsyncClient) wait for a pooled connection: none is refused "Too many connections",
    which the retry budget took for an outage ("Redis unavailable")."""
    import concurrent.futures

    from batchd import AsyncClient, Client

    caplog.set_level("WARNING", logger="batchd")
    with Client(redis_server.url, max_connections=2) as client:
        with concurrent.futures.ThreadPoolExecutor(32) as threads:
            answers = list(threads.map(lambda _: client.models(), range(200)))

    async def burst():
        async with AsyncClient(redis_server.url, max_connections=4) as client:
            return await asyncio.gather(*(client.models() for _ in range(500)))

    answers += asyncio.run(burst())
    assert answers == [[]] * 700
    assert not [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
