"""Cancel, deadlines, sizes and slot reuse: what a worker shell relies on."""

from __future__ import annotations

import random

import pytest
from batchd.client.errors import InvalidRequest, RequestTooLarge
from batchd.client.protocol import ChatMessage, Request, SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf import build_engine
from engine_helpers import Run, drive, random_prompt, request


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine(tiny_models, **options):
    options.setdefault("max_context", 64)
    return build_engine(str(tiny_models["llama"]), **options)


def test_cancel_frees_the_slot_for_a_waiting_request_in_the_same_step(tiny_models):
    engine = _engine(tiny_models, slots=1)
    prompt = random_prompt(random.Random(1), 5)
    engine.add(request("long", prompt, max_new_tokens=50, ignore_eos=True))
    engine.add(request("next", prompt, max_new_tokens=3, ignore_eos=True))
    run = Run()
    for _ in range(4):
        run.record(engine.step())
    assert (engine.num_running, engine.num_waiting, engine.free_slots) == (1, 1, 0)
    # With a step in flight, the tokens read so far trail the steps run by one.
    lag = int(engine.overlap)
    engine.cancel("long")
    outputs = engine.step()
    run.record(outputs)
    assert run.finish == {"long": "cancelled"}
    assert len(run.tokens["long"]) == 4 - lag
    # The waiting request took the freed slot in that same step, and its first token came
    # back then too (or at the next step, with one in flight).
    assert (engine.num_running, engine.num_waiting) == (1, 0)
    if lag:
        outputs = engine.step()
        run.record(outputs)
    assert [o.request_id for o in outputs if o.new_token_ids] == ["next"]
    run.record(engine.step())
    run.record(engine.step())
    assert run.finish["next"] == "length" and not engine.has_work() and engine.kv_cache_usage == 0


def test_cancel_a_waiting_request_and_an_unknown_one(tiny_models):
    engine = _engine(tiny_models, slots=1)
    prompt = random_prompt(random.Random(2), 5)
    engine.add(request("a", prompt, max_new_tokens=5))
    engine.add(request("b", prompt, max_new_tokens=5))
    engine.cancel("b", reason="deadline")
    engine.cancel("nobody")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [("b", "deadline")]
    assert engine.num_waiting == 0


def test_deadline_finishes_with_partial_text(tiny_models):
    clock = FakeClock()
    engine = _engine(tiny_models, slots=2, clock=clock)
    prompt = random_prompt(random.Random(3), 5)
    engine.add(EngineRequest("late", prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), deadline=clock.now + 5))
    engine.add(EngineRequest("fine", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True)))
    run = Run()
    for _ in range(3):
        run.record(engine.step())
    clock.now += 10
    run.record(engine.step())
    assert run.finish["late"] == "deadline"
    read = 3 - int(engine.overlap)  # a token still on its way when the deadline passed is dropped
    assert len(run.tokens["late"]) == read
    assert run.outputs["late"][-1].completion_tokens == read
    assert engine.num_running == 1
    while engine.has_work():
        run.record(engine.step())
    assert run.finish["fine"] == "length" and len(run.tokens["fine"]) == 8


def test_deadline_already_past_on_arrival(tiny_models):
    clock = FakeClock()
    engine = _engine(tiny_models, slots=2, clock=clock)
    engine.add(EngineRequest("dead", [5, 6], SamplingParams(max_new_tokens=4), deadline=clock.now - 1))
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outputs] == [("dead", "deadline", [])]


def test_request_too_large_is_refused_at_add(tiny_models):
    engine = _engine(tiny_models, slots=2, max_context=64)
    with pytest.raises(RequestTooLarge, match="64"):
        engine.add(request("big", [5] * 60, max_new_tokens=5))
    engine.add(request("fits", [5] * 60, max_new_tokens=4))
    assert engine.num_waiting == 1


def test_kv_memory_sets_the_slot_context(tiny_models):
    # llama tiny: 2 layers x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 bytes a token.
    engine = _engine(tiny_models, slots=4, max_context=None, kv_memory=4 * 100 * 512)
    assert engine.max_context == 100 and engine.kv_cache_bytes == 4 * 100 * 512
    with pytest.raises(RequestTooLarge):
        engine.add(request("big", [5] * 90, max_new_tokens=20))
    with pytest.raises(ValueError):
        _engine(tiny_models, slots=4, max_context=None, kv_memory=100)
    # flex attention allocates whole 128-token blocks plus a spare position; it must still fit.
    flex = _engine(tiny_models, slots=4, max_context=None, kv_memory=4 * 300 * 512, attention="flex")
    assert flex.max_context == 255 and flex._runner.cache_bytes <= 4 * 300 * 512


def test_bad_prompts_are_invalid_requests(tiny_models):
    engine = _engine(tiny_models, slots=2)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.add(request("oov", [5, 10_000], max_new_tokens=2))
    with pytest.raises(InvalidRequest, match="no tokens"):
        engine.add(request("empty", [], max_new_tokens=2))
    engine.add(request("dup", [5], max_new_tokens=2))
    with pytest.raises(InvalidRequest, match="already"):
        engine.add(request("dup", [5], max_new_tokens=2))


def test_tokenize(tiny_models):
    engine = _engine(tiny_models, slots=2)
    short = SamplingParams(max_new_tokens=4)
    ids = engine.tokenize(Request(v=1, id="p", prompt="The quick brown fox", params=short))
    assert engine.tokenizer.decode(ids) == "The quick brown fox"
    assert engine.tokenize(Request(v=1, id="t", prompt_token_ids=[4, 5, 6], params=short)) == [4, 5, 6]
    with pytest.raises(InvalidRequest, match="chat template"):
        engine.tokenize(Request(v=1, id="m", messages=[ChatMessage("user", "hi")], params=short))
    with pytest.raises(RequestTooLarge):
        engine.tokenize(Request(v=1, id="l", prompt="fox " * 100, params=short))
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.tokenize(Request(v=1, id="o", prompt_token_ids=[99_999], params=short))


def test_thousands_of_short_requests_keep_cache_usage_flat(tiny_models):
    engine = _engine(tiny_models, slots=4, max_context=32)
    rng = random.Random(4)
    arrivals = {}
    for index in range(2000):
        step = index // 3  # a steady stream, faster than four slots drain it at first
        arrivals.setdefault(step, []).append(
            request(f"r{index}", random_prompt(rng, rng.randint(1, 6)), max_new_tokens=rng.randint(1, 4),
                    ignore_eos=True))
    usage = []
    cache = engine._runner.keys.data_ptr()
    run = drive(engine, arrivals, on_step=lambda e, step: usage.append(e.kv_cache_usage))
    assert len(run.finish) == 2000 and set(run.finish.values()) == {"length"}
    assert max(usage) <= 4 * 9 / (4 * 32)  # never more than four live requests' tokens
    assert usage[-1] == 0 and not engine.has_work() and engine.free_slots == 4
    assert engine._runner.keys.data_ptr() == cache  # the cache was allocated once, never grown
