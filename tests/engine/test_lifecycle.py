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


def test_a_later_deadline_still_expires_after_an_earlier_ones_request_ended_and_its_id_came_back(tiny_models):
    """Steps look at requests only when the earliest live deadline has passed: an ended
    request's deadline (even under an id that came back) must not hide a later one."""
    clock = FakeClock()
    engine = _engine(tiny_models, slots=3, clock=clock)
    prompt = random_prompt(random.Random(4), 5)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    engine.add(EngineRequest("quick", prompt, params, deadline=clock.now + 5))
    engine.add(EngineRequest("slow", prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), deadline=clock.now + 20))
    run = Run()
    while "quick" not in run.finish:
        run.record(engine.step())
    assert run.finish["quick"] == "length"
    engine.add(EngineRequest("quick", prompt, SamplingParams(max_new_tokens=50, ignore_eos=True)))  # no deadline now
    run = Run()  # the id's second request
    clock.now += 10  # past the first "quick"'s deadline: nothing may end for it
    run.record(engine.step())
    assert "slow" not in run.finish and engine.num_running == 2
    clock.now += 15  # past "slow"'s
    run.record(engine.step())
    assert run.finish["slow"] == "deadline"
    assert engine.num_running == 1


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


def test_kv_memory_sets_the_pool_and_max_context_reserves_nothing(tiny_models):
    # llama tiny: 2 layers x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 bytes a token;
    # a block of 16 tokens is 8 KiB, and one block of the pool is the scratch block.
    engine = _engine(tiny_models, slots=4, max_context=None, kv_memory=21 * 16 * 512)
    assert engine.kv_cache_bytes == 21 * 16 * 512 and engine.kv_cache_tokens == 20 * 16
    assert engine.max_context == 256  # the model's context: a request may be that long
    # Four requests of 70 tokens run at once in 320 tokens of pool, where slots of 256
    # tokens each would have needed 1024.
    rng = random.Random(3)
    live = []
    run = drive(engine, {0: [request(f"r{i}", random_prompt(rng, 60), max_new_tokens=10, ignore_eos=True)
                             for i in range(4)]}, on_step=lambda e, step: live.append(e.num_running))
    assert max(live) == 4 and set(run.finish.values()) == {"length"}
    assert engine.stats()["num_preemptions"] == 0
    with pytest.raises(RequestTooLarge, match="at most 256 tokens per request"):
        engine.add(request("big", [5] * 250, max_new_tokens=10))
    with pytest.raises(RequestTooLarge, match="at most 64 tokens per request"):
        _engine(tiny_models, slots=4, kv_memory=21 * 16 * 512).add(request("long", [5] * 60, max_new_tokens=10))
    # A request may be no longer than the whole pool holds.
    small = _engine(tiny_models, slots=4, max_context=None, kv_memory=5 * 16 * 512)
    assert small.max_context == 64
    with pytest.raises(ValueError, match="less than one block"):
        _engine(tiny_models, slots=4, max_context=None, kv_memory=100)
    # flex attention's blocks are 128 tokens (its sparse block); the pool still fits the budget.
    flex = _engine(tiny_models, slots=4, max_context=None, kv_memory=4 * 300 * 512, attention="flex")
    assert flex.kv_cache_tokens == 8 * 128 and flex.kv_cache_bytes <= 4 * 300 * 512


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
    cache = engine._runner.pool.keys.data_ptr()
    run = drive(engine, arrivals, on_step=lambda e, step: usage.append(e.kv_cache_usage))
    assert len(run.finish) == 2000 and set(run.finish.values()) == {"length"}
    # Never more than four live requests' blocks (at most 10 tokens each: one block of 16).
    assert max(usage) * engine.kv_cache_tokens <= 4 * 16
    assert usage[-1] == 0 and not engine.has_work() and engine.free_slots == 4
    assert engine._runner.pool.keys.data_ptr() == cache  # the pool was allocated once, never grown


def test_the_pool_never_outgrows_32_bit_kernel_offsets():
    """One layer's keys are indexed with 32-bit offsets in the attention kernels: a pool sized
    from memory alone (a tiny model, a large budget) is cut to what they can address."""
    from types import SimpleNamespace

    import torch
    from batchd.workers.hf.engine import _size_pool

    config = SimpleNamespace(max_position_embeddings=4096, num_hidden_layers=2)
    # 64 elements a position: 2**31 / 64 positions at most, in blocks of 128.
    context, blocks = _size_pool(config, 16, None, 2**40, 128, 512, torch.device("cpu"), 64)
    assert blocks == (2**31 - 1) // 64 // 128 and context == 4096
