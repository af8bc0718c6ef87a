"""`batchd gateway` through OpenAI's own Python SDK: real redis-server, scheduler, workers and
gateway processes. Answers equal Client.generate's; errors have OpenAI's shapes and codes;
a caller that goes away cancels its request on the worker."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
import redis

from batchd import Client, Overloaded
from batchd.client.keys import Keys
from batchd.client.protocol import FinalEvent, decode_event
from batchd.status import read_status
from test_security import acl_server, url_for  # noqa: F401 (fixture)


MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(fleet, *extra: str) -> str:
    port = free_port()
    process = fleet.start("gateway", "--port", str(port), *extra)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gateway exited {process.returncode}\n{fleet.logs()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"gateway did not come up\n{fleet.logs()}")


@pytest.fixture(scope="module")
def fleet(module_daemons):
    """One redis-server, scheduler, echo worker and gateway for the module."""
    module_daemons.scheduler()
    module_daemons.echo_worker("--worker-id", "echo-1")
    module_daemons.wait_for_workers(1)
    module_daemons.base = start_gateway(module_daemons)
    return module_daemons


def sdk(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_completion_streaming_and_not_equals_client_generate(fleet):
    with Client(fleet.url) as client:
        expected = client.generate(messages=MESSAGES, max_new_tokens=20)
    openai_client = sdk(fleet.base)
    whole = openai_client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=20)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.model == "echo" and whole.object == "chat.completion"
    assert whole.usage.completion_tokens == 20 and whole.usage.prompt_tokens == expected.usage.prompt_tokens

    chunks = list(openai_client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=20, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len(chunks) > 5  # token by token, not one lump


def test_text_completions_several_prompts_and_choices_streaming_and_not(fleet):
    openai_client = sdk(fleet.base)
    prompts = ["first prompt", "second, longer prompt"]
    whole = openai_client.completions.create(model="echo", prompt=prompts, n=2, max_tokens=100, seed=7)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert {c.finish_reason for c in whole.choices} == {"stop"}

    texts: dict[int, str] = {}
    for chunk in openai_client.completions.create(model="echo", prompt=prompts, n=2, max_tokens=100, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [prompts[0]] * 2 + [prompts[1]] * 2

    by_ids = openai_client.completions.create(model="echo", prompt=list(b"token ids"), max_tokens=100)
    assert by_ids.choices[0].text == "token ids"


def test_models_health_and_metrics(fleet):
    assert [m.id for m in sdk(fleet.base).models.list()] == ["echo"]
    health = httpx.get(fleet.base + "/health").json()
    assert health == {"status": "ok", "models": ["echo"]}
    sdk(fleet.base).completions.create(model="echo", prompt="counted", max_tokens=5)
    text = httpx.get(fleet.base + "/metrics").text
    assert 'batchd:gateway_requests_total{endpoint="completions",model_name="echo",status="200"}' in text



def test_callers_finding_the_models_view_stale_share_one_read():
    """Every call checks its model against a view of the models served that lasts 1 s. A burst
    arriving once it is stale must share one read: the gateway reads with 4 connections, and
    one read each answered 503 "Too many connections" on a 16-core host (2026-12-04). A failed
    read fails its callers, and the next call reads again."""
    import asyncio

    from batchd.client.errors import BrokerUnavailable
    from batchd.gateway import Gateway, GatewayConfig

    class Fleet:
        def __init__(self):
            self.reads = self.reading = self.most_at_once = 0
            self.fail = False

        async def models(self):
            self.reads += 1
            self.reading += 1
            self.most_at_once = max(self.most_at_once, self.reading)
            await asyncio.sleep(0.05)
            self.reading -= 1
            if self.fail:
                raise BrokerUnavailable("Redis is down")
            return ["echo"]

    async def burst():
        gateway = Gateway(GatewayConfig(redis_url="redis://unused"))
        gateway._fleet = fleet = Fleet()
        assert await asyncio.gather(*(gateway.models() for _ in range(64))) == [["echo"]] * 64
        assert (fleet.reads, fleet.most_at_once) == (1, 1)
        one = asyncio.ensure_future(gateway.models(fresh=True))
        await asyncio.sleep(0.01)
        one.cancel()  # a caller that went away does not cancel the read the others wait for
        assert await gateway.models(fresh=True) == ["echo"] and fleet.reads == 2
        fleet.fail = True
        failed = await asyncio.gather(*(gateway.models(fresh=True) for _ in range(8)), return_exceptions=True)
        assert all(isinstance(error, BrokerUnavailable) for error in failed) and fleet.reads == 3
        fleet.fail = False
        assert await gateway.models(fresh=True) == ["echo"] and fleet.reads == 4

    asyncio.run(burst())


def test_metrics_on_a_port_of_their_own_leave_the_api_port(fleet):
    """--metrics-port/--metrics-host: Prometheus scrapes there, and callers of the API port
    no longer read every key's traffic from /metrics."""
    port = free_port()
    base = start_gateway(fleet, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    sdk(base).completions.create(model="echo", prompt="counted", max_tokens=5)
    assert httpx.get(base + "/metrics").status_code == 404
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'batchd:gateway_requests_total{endpoint="completions",model_name="echo",status="200"}' in text

def test_errors_have_openai_shapes_and_status_codes(fleet):
    openai_client = sdk(fleet.base)
    with pytest.raises(openai.NotFoundError) as unknown:
        openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert unknown.value.code == "model_not_found" and "echo" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model="echo", messages=MESSAGES, temperature=5)
    assert "temperature" in bad.value.message and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as tools:
        openai_client.chat.completions.create(model="echo", messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert tools.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as alternatives_alone:
        openai_client.chat.completions.create(model="echo", messages=MESSAGES, top_logprobs=2)
    assert alternatives_alone.value.body["param"] == "top_logprobs"
    for stream in (False, True):  # the echo engine has no model; a stream's first event is the refusal
        with pytest.raises(openai.BadRequestError, match="no log-probabilities"):
            openai_client.chat.completions.create(model="echo", messages=MESSAGES, logprobs=True, stream=stream)
    reply = httpx.post(fleet.base + "/v1/completions", content=b"{not json", timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_request"
    # A prompt the worker refuses (outside the echo engine's vocabulary) is a 400 too.
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model="echo", prompt=[300, 301], max_tokens=5)
    # The daemons and the gateway keep serving.
    assert openai_client.completions.create(model="echo", prompt="still here", max_tokens=20).choices[0].text == "still here"


def _cancelled_results(url: str) -> list:
    client = redis.Redis.from_url(url)
    found = []
    for key in client.scan_iter(Keys().result("*")):
        event = decode_event(client.get(key))
        if isinstance(event, FinalEvent) and event.result.finish_reason == "cancelled":
            found.append(event.result)
    return found


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_a_caller_that_disconnects_cancels_its_request_on_the_worker(daemons):
    fleet = daemons
    fleet.scheduler()
    # 20 ms a token: the 2,000-character answer would take 40 s.
    fleet.echo_worker("--token-delay-ms", "20", "--slots", "8", "--worker-id", "slow")
    fleet.wait_for_workers(1)
    base = start_gateway(fleet)
    long_prompt = "x" * 2000
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", base + "/v1/chat/completions", json={
                "model": "echo", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2000,
                "stream": True}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            next(line for line in lines if line.startswith("data: "))  # a token: it runs on the worker
    request_id = first.split('"id":"chatcmpl-', 1)[1].split('"', 1)[0]
    started = time.monotonic()
    cancelled = _wait_for(lambda: [r for r in _cancelled_results(fleet.url) if r.request_id == request_id])
    assert cancelled and cancelled[0].worker == "slow", fleet.logs()  # the worker itself ended it
    assert cancelled[0].usage.completion_tokens < 500
    assert time.monotonic() - started < 5
    # Its slot is free again: the worker advertises all 8.
    assert _wait_for(lambda: read_status(redis.Redis.from_url(fleet.url), Keys())["workers"][0]["free_slots"]
                     >= 8)

    # The same for a call that waits for the whole answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json={"model": "echo", "prompt": long_prompt, "max_tokens": 2000},
                   timeout=1.0)
    assert _wait_for(lambda: len(_cancelled_results(fleet.url)) == 2), fleet.logs()
    text = httpx.get(base + "/metrics").text
    assert 'batchd:gateway_disconnects_total{endpoint="completions",model_name="echo"} 1.0' in text


def test_overload_is_429_with_retry_after_and_deadline_is_504(daemons):
    fleet = daemons
    fleet.scheduler("--max-queue", "2")
    fleet.start("worker", "--engine", "echo", "--token-delay-ms", "50", "--slots", "1")
    fleet.wait_for_workers(1)
    base = start_gateway(fleet, "--request-timeout", "1")
    with pytest.raises(openai.APIStatusError) as late:  # 60 tokens at 50 ms: past the 1 s deadline
        sdk(base).completions.create(model="echo", prompt="y" * 60, max_tokens=60)
    assert late.value.status_code == 504 and late.value.body["type"] == "timeout"

    with Client(fleet.url) as client:
        # Requests take the only slot, then wait in the queue until it is full.
        held = []
        with pytest.raises(Overloaded):
            for _ in range(10):
                held.append(client.submit("z" * 400, max_new_tokens=400))
                time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as limited:
            sdk(base).chat.completions.create(model="echo", messages=MESSAGES)
        for handle in held:
            handle.cancel()
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.status_code == 429 and "max_queue" in limited.value.message


def test_api_keys_map_callers_to_producers_and_no_key_means_loopback_only(daemons, tmp_path):
    fleet = daemons
    fleet.scheduler()
    fleet.echo_worker()
    fleet.wait_for_workers(1)
    keys_file = tmp_path / "keys"
    keys_file.write_text("# key producer\nteam-a-secret team-a\n")
    base = start_gateway(fleet, "--api-key", "k1", "--api-keys-file", str(keys_file))
    with pytest.raises(openai.AuthenticationError):
        sdk(base, "wrong").completions.create(model="echo", prompt="hi", max_tokens=2)
    assert httpx.get(base + "/v1/models").status_code == 401
    assert sdk(base, "k1").completions.create(model="echo", prompt="hi", max_tokens=2).choices[0].text == "hi"
    # The request carried the key's producer identity (the scheduler's fair share and tenancy see it).
    monitor = redis.Redis.from_url(fleet.url)
    with monitor.monitor() as watch:
        sdk(base, "team-a-secret").completions.create(model="echo", prompt="from a", max_tokens=6)
        commands = [next(watch.listen())["command"] for _ in range(40)]
    assert any("team-a" in c and "evalsha" in c.lower() for c in commands), commands

    refused = fleet.start("gateway", "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.wait(timeout=30) == 2
    assert "without API keys" in refused.log_path.read_text()


def test_the_gateway_runs_with_the_documented_acl_users(acl_server, daemons, tmp_path):
    """Each key's requests go through the producer ACL user of docs/security.md; the gateway reads
    the fleet through --redis, as its own user (batchd-gateway). A gateway whose --redis is a
    producer user cannot list models but still serves (the schedulers judge the model)."""
    daemons.url = url_for(acl_server, "batchd-scheduler")
    daemons.scheduler()
    daemons.url = url_for(acl_server, "batchd-worker-gpu-0")
    daemons.echo_worker("--worker-id", "gpu-0")
    daemons.url = url_for(acl_server, "batchd-operator")
    daemons.wait_for_workers(1)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"team-key team-a {url_for(acl_server, 'batchd-producer')}\n")
    daemons.url = url_for(acl_server, "batchd-gateway")
    base = start_gateway(daemons, "--api-keys-file", str(keys_file), "--api-key", "own-key")
    own = sdk(base, "own-key")  # no URL of its own: submits as batchd-gateway
    assert own.completions.create(model="echo", prompt="as the gateway", max_tokens=20).choices[0].text \
        == "as the gateway"
    client = sdk(base, "team-key")
    assert [m.id for m in client.models.list()] == ["echo"]
    assert client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=5).choices[0].message.content \
        == "Answe"
    assert "".join(c.choices[0].text for c in client.completions.create(
        model="echo", prompt="streamed", max_tokens=20, stream=True) if c.choices) == "streamed"

    daemons.url = url_for(acl_server, "batchd-producer")
    narrow = sdk(start_gateway(daemons, "--api-key", "k"), "k")
    assert narrow.models.list().data == []
    assert narrow.completions.create(model="echo", prompt="still served", max_tokens=20).choices[0].text == "still served"
    with pytest.raises(openai.NotFoundError, match="echo"):  # refused by the scheduler, listing what is served
        narrow.completions.create(model="nope", prompt="x", max_tokens=2)
