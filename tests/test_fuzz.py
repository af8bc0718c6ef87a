"""Property-based fuzzing of the request stream and of the client API's arguments.

Stream: hostile payloads go straight onto the request stream (as a buggy or
malicious producer in any language could put them) while real scheduler and
worker processes run. Each one must end as a typed error (or a normal result,
when the fuzzer happens to build a valid request), no daemon may die, and a
valid request sent alongside every batch must still be answered correctly.

Client: every argument of Client.submit gets hostile values; the call either
succeeds or raises InvalidRequest, never another exception.
"""

from __future__ import annotations

import itertools
import math
import time

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from batchd import Client
from batchd.client.errors import BatchdError, InvalidRequest
from batchd.client.keys import Keys
from batchd.client.protocol import (
    MAX_PROMPT_CHARS,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    FinalEvent,
    Request,
    decode_event,
    encode,
)

KEYS = Keys()
TYPED_ERRORS = {"invalid_request", "unsupported_version", "request_too_large", "deadline_exceeded"}
FIELDS = ["v", "id", "prompt", "messages", "prompt_token_ids", "params", "priority", "producer", "deadline",
          "submitted_at", "attempt"]
PARAM_FIELDS = ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos"]

small_ints = st.integers(min_value=-5, max_value=300)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=10), small_ints), inner, max_size=5)),
    max_leaves=20)


@st.composite
def near_valid(draw, entry_id: str) -> bytes:
    """A request map that is right in most places and wrong in a few."""
    fields = {"v": draw(st.one_of(st.just(PROTOCOL_VERSION), values)),
              "id": draw(st.one_of(st.just(entry_id), values))}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        fields[name] = draw(st.one_of(
            values,
            st.text(min_size=1, max_size=30),
            st.lists(small_ints, max_size=8),
            st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]), st.one_of(st.text(max_size=20), values),
                                     max_size=3), max_size=3),
            st.dictionaries(st.sampled_from(PARAM_FIELDS + ["bogus"]), st.one_of(small_ints, values), max_size=4),
        ))
    if draw(st.booleans()):
        fields[draw(st.text(min_size=1, max_size=12))] = draw(values)  # unknown field
    return msgpack.packb(fields, use_bin_type=draw(st.booleans()))


def hostile_payload(entry_id: str):
    return st.one_of(
        st.binary(max_size=200),
        values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        near_valid(entry_id),
    )


_entry_ids = itertools.count()


def wait_for_results(client: redis.Redis, ids: list[str], timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        stored = client.mget([KEYS.result(i) for i in ids])
        if all(raw is not None for raw in stored) or time.monotonic() > deadline:
            return stored
        time.sleep(0.02)


@pytest.fixture
def running(redis_server, daemons, redis_client):
    daemons.scheduler("--max-wait-ms", "5")
    daemons.echo_worker()
    daemons.wait_for_workers(1)
    yield redis_client
    assert all(p.poll() is None for p in daemons.processes), daemons.logs()


BATCH = 40
EXAMPLES = 20  # 20 x 40 = 800 hostile payloads


# No shrinking: each example drives real processes, and the failure message
# already names the payload.
@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_hostile_payloads_on_the_request_stream_get_typed_errors(running, daemons, data):
    client = running
    ids, payloads = [], []
    for _ in range(BATCH):
        entry_id = f"fz-{next(_entry_ids)}"
        ids.append(entry_id)
        payloads.append(data.draw(hostile_payload(entry_id)))
    canary = f"canary-{next(_entry_ids)}"
    with client.pipeline(transaction=False) as pipe:
        for entry_id, payload in zip(ids, payloads):
            pipe.xadd(KEYS.requests, {"id": entry_id, "data": payload})
        pipe.xadd(KEYS.requests, {"id": canary, "data": encode(
            Request(v=PROTOCOL_VERSION, id=canary, prompt="still served", submitted_at=time.time()))})
        pipe.execute()
    stored = wait_for_results(client, ids + [canary])
    for entry_id, payload, raw in zip(ids + [canary], payloads + [b""], stored):
        assert raw is not None, f"no outcome for {entry_id} (payload {payload[:80]!r})\n{daemons.logs()[-3000:]}"
        event = decode_event(raw)
        assert isinstance(event, FinalEvent)
        result = event.result
        if result.error is not None:
            assert result.error.type in TYPED_ERRORS, (payload, result)
            assert result.error.message
        else:
            assert result.finish_reason in ("stop", "length"), (payload, result)
    canary_result = decode_event(stored[-1]).result
    assert (canary_result.text, canary_result.error) == ("still served", None)


def test_broken_stream_entries_and_oversized_requests(running, daemons):
    """Entries no fuzzed payload reaches: missing fields, odd ids, size limits."""
    client = running
    client.xadd(KEYS.requests, {"no": "data"})
    client.xadd(KEYS.requests, {"id": b"\xff\xfe", "data": b"\x80"})
    client.xadd(KEYS.requests, {"id": "has spaces and / slashes", "data": b"\x80"})
    too_long = Request(v=PROTOCOL_VERSION, id="too-long", prompt="a" * (MAX_PROMPT_CHARS + 1))
    huge = msgpack.packb({"v": 1, "id": "too-big", "prompt": "b" * (MAX_REQUEST_BYTES + 10)})
    deep = b"\x91" * 100_000 + b"\xc0"  # 100,000 nested one-element arrays
    many = msgpack.packb({"v": 1, "id": "many-messages", "messages": [{"role": "user", "content": "x"}] * 2000})
    client.xadd(KEYS.requests, {"id": "too-long", "data": encode(too_long)})
    client.xadd(KEYS.requests, {"id": "too-big", "data": huge})
    client.xadd(KEYS.requests, {"id": "deep", "data": deep})
    client.xadd(KEYS.requests, {"id": "many-messages", "data": many})
    ids = ["too-long", "too-big", "deep", "many-messages"]
    stored = wait_for_results(client, ids)
    errors = {i: decode_event(raw).result.error for i, raw in zip(ids, stored)}
    assert all(e is not None and e.type == "invalid_request" for e in errors.values()), errors
    assert "limit" in errors["too-big"].message
    # Every bad entry, addressable or not, is kept for operators.
    assert client.xlen(KEYS.dead_letters) == 7
    with Client(daemons.url) as producer:
        assert producer.generate("after the garbage", timeout=20).text == "after the garbage"


# -- the client API ---------------------------------------------------------
def anything(*extra):
    return st.one_of(values, *extra)


submit_kwargs = st.fixed_dictionaries({}, optional={
    "prompt": anything(st.text(min_size=1, max_size=50)),
    "messages": anything(st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                                  anything(st.text(max_size=20)), max_size=3), max_size=3)),
    "prompt_token_ids": anything(st.lists(st.integers(min_value=-10, max_value=2**40), max_size=5)),
    "max_new_tokens": anything(st.integers(min_value=-10, max_value=2**40)),
    "temperature": anything(st.floats(allow_nan=True)),
    "top_p": anything(st.floats(allow_nan=True)),
    "top_k": anything(small_ints),
    "seed": anything(st.integers(min_value=-10, max_value=2**70)),
    "stop": anything(st.lists(st.text(max_size=300), max_size=20)),
    "stop_token_ids": anything(st.lists(small_ints, max_size=70)),
    "ignore_eos": anything(),
    "priority": anything(st.integers(min_value=-200, max_value=200)),
    "timeout": anything(st.floats(allow_nan=True)),
    "deadline": anything(st.floats(allow_nan=True)),
    "request_id": anything(st.text(max_size=140), st.from_regex(r"[A-Za-z0-9._:\-]{1,20}", fullmatch=True)),
})


@pytest.fixture(scope="module")
def api_client():
    import shutil

    from batchd.embedded import EmbeddedServer

    with EmbeddedServer(binary=shutil.which("redis-server")) as server:
        with Client(server.url) as client:
            yield client


@settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate, Phase.shrink])
@given(kwargs=submit_kwargs)
def test_client_submit_arguments_fail_only_with_invalid_request(api_client, kwargs):
    try:
        handle = api_client.submit(**kwargs)
    except InvalidRequest as exc:
        assert exc.message
        return
    # Accepted: then it must be a request the daemons accept too.
    api_client._forget(handle.request_id)
    given_prompts = [k for k in ("prompt", "messages", "prompt_token_ids") if kwargs.get(k) is not None]
    assert len(given_prompts) == 1
    for name in ("temperature", "top_p", "timeout", "deadline"):
        value = kwargs.get(name)
        assert not (isinstance(value, float) and math.isnan(value)), f"{name}=nan was accepted"


def test_errors_are_batchd_errors():
    assert issubclass(InvalidRequest, BatchdError)


@pytest.mark.parametrize("backend", ["fakeredis", "redis-server"])
def test_a_request_refused_at_admission_does_not_close_its_job_early(backend, request):
    """Found by the stream fuzzer: a job whose first request the engine refuses and whose
    second it accepts crashed the worker (its job was acknowledged before the second was admitted)."""
    import fakeredis

    from batchd.client.protocol import Job
    from batchd.workers.echo import EchoEngine
    from batchd.workers.worker import Worker, WorkerConfig

    client = fakeredis.FakeRedis() if backend == "fakeredis" else request.getfixturevalue("redis_client")
    worker = Worker(WorkerConfig(worker_id="w1"), EchoEngine(slots=4), connect=lambda: client)
    worker._connect()
    refused = Request(v=PROTOCOL_VERSION, id="refused", prompt_token_ids=[300])  # echo's vocabulary is bytes
    fine = Request(v=PROTOCOL_VERSION, id="fine", prompt="ok")
    job = Job(v=PROTOCOL_VERSION, job_id="j", scheduler="s", created_at=0.0, requests=[refused, fine])
    client.xadd(KEYS.jobs("w1"), {"job": encode(job)})
    for _ in range(10):  # each iteration may wait for jobs up to a heartbeat interval: stop once done
        worker.run_once()
        if client.exists(KEYS.result("refused"), KEYS.result("fine")) == 2 and client.xlen(KEYS.jobs("w1")) == 0:
            break
    results = {i: decode_event(client.get(KEYS.result(i))).result for i in ("refused", "fine")}
    assert results["refused"].error.type == "invalid_request"
    assert results["fine"].text == "ok"
    assert client.xlen(KEYS.jobs("w1")) == 0  # acknowledged once both were done
