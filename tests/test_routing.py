"""Routing by model, end to end: one fleet serving three models (the echo engine under two
names and a tiny random Llama); each request is answered by a worker serving the model it
names, the tiny model's answers equal Hugging Face generate, an unknown model is a typed
error listing those served, and metrics carry the model."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgpack
import openai
import pytest
import redis
import torch

from batchd import AsyncClient, Client, UnknownModel
from batchd.client.keys import Keys

from test_gateway import free_port, sdk, start_gateway
from test_scoring import _byte_tokenizer, _tiny_llama

TINY_PROMPTS = ["Paris is the", "One, two,", "abc", "Hello there, general"]
MAX_NEW_TOKENS = 8
EOS = 2
# The byte tokenizer knows printable ASCII only: a chat template without newlines.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _tiny_llama()
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(folder)
    tokenizer = _byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def three_models(tiny, module_daemons):
    fleet = module_daemons
    fleet.metrics_port = free_port()
    fleet.scheduler("--metrics-port", str(fleet.metrics_port))
    fleet.echo_worker("--served-model-name", "echo-a", "--worker-id", "worker-a")
    # One worker may answer to several names (an alias, a version tag).
    fleet.echo_worker("--served-model-name", "echo-b", "--served-model-name", "echo-b-latest",
                      "--worker-id", "worker-b")
    fleet.start("worker", "--engine", "hf", "--model", str(tiny[1]), "--device", "cpu", "--dtype", "float32",
                "--slots", "4", "--served-model-name", "tiny", "--worker-id", "worker-tiny")
    fleet.wait_for_workers(3, timeout=120)
    return fleet


def hf_answer(model, prompt: str) -> list[int]:
    ids = _byte_tokenizer()(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
    return [t for t in out[0, len(ids):].tolist() if t != EOS]


WORKER_OF = {"echo-a": "worker-a", "echo-b": "worker-b", "echo-b-latest": "worker-b", "tiny": "worker-tiny"}


def test_each_request_is_answered_by_a_worker_serving_its_model(three_models, tiny):
    model = tiny[0]
    with Client(three_models.url) as client:
        assert client.models() == ["echo-a", "echo-b", "echo-b-latest", "tiny"]
        handles = []
        for i in range(24):
            name = ["echo-a", "echo-b", "tiny", "echo-b-latest"][i % 4]
            prompt = TINY_PROMPTS[i % len(TINY_PROMPTS)] if name == "tiny" else f"request {i} for {name}"
            handles.append((name, prompt, client.submit(prompt, model=name, max_new_tokens=MAX_NEW_TOKENS
                                                        if name == "tiny" else 64, timeout=60)))
        for name, prompt, handle in handles:
            result = handle.result()
            assert result.worker == WORKER_OF[name], (name, result.worker)
            if name == "tiny":
                assert [t for t in result.token_ids if t != EOS] == hf_answer(model, prompt), prompt
            else:
                assert result.text == prompt
        # Scoring requests are routed too: the echo engines have no model to score with.
        score = client.score("Paris is the", " capital", model="tiny", timeout=30)
        assert len(score.token_logprobs) == len(" capital")


def test_an_unknown_model_or_none_in_a_fleet_of_several_is_a_typed_error_listing_the_models(three_models):
    async def ask():
        async with AsyncClient(three_models.url) as client:
            assert await client.models() == ["echo-a", "echo-b", "echo-b-latest", "tiny"]
            with pytest.raises(UnknownModel) as unknown:
                await client.generate("hi", model="gpt-4o", timeout=30)
            with pytest.raises(UnknownModel, match="name one"):
                await client.generate("hi", timeout=30)
            answer = await client.generate("async", model="echo-a", timeout=30)
            return unknown.value, answer

    unknown, answer = asyncio.run(ask())
    assert "'gpt-4o'" in unknown.message and "echo-a, echo-b, echo-b-latest, tiny" in unknown.message
    assert answer.worker == "worker-a" and answer.text == "async"


def test_a_producer_that_names_no_model_still_works_where_one_model_is_served(daemons):
    """A producer written before routing by model (no `model` field) gets the fleet's only model."""
    daemons.scheduler()
    daemons.echo_worker("--served-model-name", "only")
    daemons.wait_for_workers(1)
    raw = redis.Redis.from_url(daemons.url)
    keys = Keys()
    pubsub = raw.pubsub()
    pubsub.subscribe(keys.channel("old-1"))
    payload = msgpack.packb({"v": 1, "id": "old-1", "prompt": "from an old producer"})
    raw.xadd(keys.requests, {"id": "old-1", "data": payload})
    with Client(daemons.url) as client:
        for _ in range(200):
            stored = client.fetch_result("old-1")
            if stored is not None:
                break
            time.sleep(0.05)
        assert stored is not None and stored.text == "from an old producer" and stored.error is None
        assert client.generate("named", model="only", timeout=30).text == "named"


def test_the_gateway_routes_by_model_and_matches_client_generate(three_models, tiny):
    base = start_gateway(three_models)
    openai_client = sdk(base)
    assert [m.id for m in openai_client.models.list()] == ["echo-a", "echo-b", "echo-b-latest", "tiny"]
    with Client(three_models.url) as client:
        for prompt in TINY_PROMPTS:
            expected = client.generate(prompt, model="tiny", max_new_tokens=MAX_NEW_TOKENS, timeout=60)
            whole = openai_client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_NEW_TOKENS,
                                                     temperature=0)
            streamed = "".join(c.choices[0].text for c in openai_client.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True) if c.choices)
            assert whole.choices[0].text == expected.text == streamed
            assert whole.usage.completion_tokens == expected.usage.completion_tokens
            # logprobs=0: each token's own logprob, as the model scores the answer.
            scored = openai_client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_NEW_TOKENS,
                                                      temperature=0, logprobs=0)
            reference = client.score(prompt, continuation_token_ids=expected.token_ids, model="tiny", timeout=30)
            assert scored.choices[0].text == expected.text
            assert scored.choices[0].logprobs.token_logprobs == pytest.approx(reference.token_logprobs, abs=1e-4)
            assert "".join(scored.choices[0].logprobs.tokens) == expected.text
        # Chat through the model's chat template: streamed and not, the tokens of Client.generate.
        for question in ("What is 2+2?", "Say hi"):
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
            expected = client.generate(messages=messages, model="tiny", max_new_tokens=MAX_NEW_TOKENS, timeout=60)
            whole = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW_TOKENS,
                                                          temperature=0, logprobs=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True) if c.choices)
            assert whole.choices[0].message.content == expected.text == streamed
            reference = client.score(messages=messages, continuation_token_ids=expected.token_ids, model="tiny",
                                     timeout=30)
            assert [e.logprob for e in whole.choices[0].logprobs.content] == pytest.approx(
                reference.token_logprobs, abs=1e-4)
            assert "".join(e.token for e in whole.choices[0].logprobs.content) == expected.text
            # top_logprobs: the most likely alternatives at each position, streamed and not.
            ranked = openai_client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                           max_tokens=MAX_NEW_TOKENS, logprobs=True, top_logprobs=3)
            chunks = list(openai_client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True,
                logprobs=True, top_logprobs=3))
            content = ranked.choices[0].logprobs.content
            streamed_content = [e for c in chunks if c.choices and c.choices[0].logprobs
                                for e in c.choices[0].logprobs.content]
            assert [(e.token, e.logprob) for e in streamed_content] == [(e.token, e.logprob) for e in content]
            for entry, token_id in zip(content, expected.token_ids):
                assert len(entry.top_logprobs) == 3
                assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy: the top
                assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                         reverse=True)
        # Completions' shape, streamed: tokens join into the text, text_offset counts it.
        chunks = [c for c in openai_client.completions.create(model="tiny", prompt=TINY_PROMPTS[0], temperature=0,
                                                              max_tokens=MAX_NEW_TOKENS, stream=True, logprobs=2)
                  if c.choices and c.choices[0].logprobs]
        tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
        assert "".join(tokens) == "".join(c.choices[0].text for c in chunks)
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        assert all(len(top) <= 2 for c in chunks for top in c.choices[0].logprobs.top_logprobs)
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.completions.create(prompt="hi", model="nope")
    assert "echo-a, echo-b, echo-b-latest, tiny" in missing.value.message
    unnamed = httpx.post(base + "/v1/completions", json={"prompt": "hi"}, timeout=10)  # the SDK insists on a model
    assert unnamed.status_code == 404 and "name one" in unnamed.json()["error"]["message"]
    assert openai_client.completions.create(model="echo-b", prompt="bee", max_tokens=9).choices[0].text == "bee"


def test_metrics_are_labelled_by_model(three_models):
    with Client(three_models.url) as client:
        client.generate("counted", model="echo-b", timeout=30)
    text = httpx.get(f"http://127.0.0.1:{three_models.metrics_port}/metrics").text
    assert 'batchd:requests_received_total{model_name="echo-b",priority="0"}' in text

