"""Scoring requests inside the engine's steps, and prefixes a free slot still holds.

next_token_logprobs / score requests prefill their tokens as rows of the same
steps as generate requests (prefill-only: nothing is decoded) and must equal a
Hugging Face forward pass's log_softmax whatever their batch mates; a request
whose tokens start with what a free slot's cache holds takes that slot and
skips those tokens, and its output must not change.
"""

from __future__ import annotations

import random

import pytest
import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf import build_engine
from batchd.workers.engine import ScoreItem
from engine_helpers import drive, hf_greedy, random_prompt, request

TOLERANCE = 1e-4


def _reference(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def _score(engine, request_id: str, prompt: list[int], continuation: list[int] | None = None, top_k=None):
    engine.add_score(EngineRequest(request_id, prompt, SamplingParams()), ScoreItem(prompt, continuation, top_k))


def _scores(outputs) -> dict:
    return {o.request_id: o.score for o in outputs if o.score is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_scoring_rows_share_steps_with_generate_and_match_a_forward_pass(tiny_models, reference_models, kind):
    model = reference_models[kind]
    # A small prefill budget splits long continuations over several steps.
    engine = build_engine(str(tiny_models[kind]), slots=3, max_context=128, max_prefill_tokens=9)
    assert engine.scores_in_steps
    mixed_steps = []
    take = engine._take_scores

    def watched(logits, rows, sequences):
        mixed_steps.append(any(s.score is None for s in sequences))
        return take(logits, rows, sequences)

    engine._take_scores = watched
    rng = random.Random(2)
    prompts = [random_prompt(rng, rng.randint(1, 30)) for _ in range(6)]
    continuation = random_prompt(rng, 17)
    scores = {}
    run_tokens = {}
    for index, prompt in enumerate(prompts):
        engine.add(request(f"gen{index}", prompt, max_new_tokens=10))
    _score(engine, "full", prompts[0])
    _score(engine, "top", prompts[1], top_k=5)
    _score(engine, "cont", prompts[2], continuation)
    _score(engine, "short", prompts[3], continuation[:1])
    while engine.has_work():
        outputs = engine.step()
        scores.update(_scores(outputs))
        for o in outputs:
            run_tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert any(mixed_steps), "no step carried scoring and generate rows together"

    expected = _reference(model, prompts[0])[-1]
    assert scores["full"].next_token_logprobs.tolist() == pytest.approx(expected.tolist(), abs=TOLERANCE)
    top = torch.topk(_reference(model, prompts[1])[-1], 5)
    assert scores["top"].top_token_ids == top.indices.tolist()
    assert scores["top"].top_logprobs == pytest.approx(top.values.tolist(), abs=TOLERANCE)
    for name, prompt, tail in (("cont", prompts[2], continuation), ("short", prompts[3], continuation[:1])):
        rows = _reference(model, prompt + tail)[len(prompt) - 1:-1]
        want = rows.gather(1, torch.tensor(tail)[:, None])[:, 0]
        assert scores[name].token_logprobs == pytest.approx(want.tolist(), abs=TOLERANCE)
        assert scores[name].total_logprob == pytest.approx(float(want.sum()), abs=TOLERANCE)
    for index, prompt in enumerate(prompts):
        assert run_tokens[f"gen{index}"] == hf_greedy(model, prompt, 10)
    assert not engine.has_work() and engine.kv_cache_usage == 0


def test_a_particle_filters_next_prefix_is_not_recomputed(tiny_models, reference_models):
    """Step t asks for the next token after a prefix; step t+1 after that prefix and one
    more token: the blocks the first left still hold the prefix, so only the new token runs."""
    model = reference_models["llama"]
    engine = build_engine(str(tiny_models["llama"]), slots=4, max_context=128)
    rng = random.Random(3)
    prefix = random_prompt(rng, 20)
    for step in range(4):
        before = engine.stats()
        _score(engine, f"s{step}", prefix, top_k=3)
        scores = {}
        while engine.has_work():
            scores.update(_scores(engine.step()))
        top = torch.topk(_reference(model, prefix)[-1], 3)
        assert scores[f"s{step}"].top_token_ids == top.indices.tolist()
        assert scores[f"s{step}"].top_logprobs == pytest.approx(top.values.tolist(), abs=TOLERANCE)
        after = engine.stats()
        if step:  # all but the new token came from the cache
            assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == len(prefix) - 1
            assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] == 1
        prefix = prefix + [top.indices[0].item()]


def test_a_prompt_that_continues_a_finished_conversation_reuses_its_blocks_exactly(tiny_models, reference_models):
    model = reference_models["qwen3"]
    engine = build_engine(str(tiny_models["qwen3"]), slots=3, max_context=128)
    rng = random.Random(4)
    first = random_prompt(rng, 15)
    answer = drive(engine, {0: [request("turn1", first, max_new_tokens=8, ignore_eos=True)]}).tokens["turn1"]
    # The next turn: the whole first exchange, then new user tokens.
    second = first + answer[:7] + random_prompt(rng, 6)
    before = engine.stats()["prefix_cache_hits"]
    others = [request(f"other{i}", random_prompt(rng, 9), max_new_tokens=5) for i in range(2)]
    run = drive(engine, {0: [request("turn2", second, max_new_tokens=8)] + others})
    assert engine.stats()["prefix_cache_hits"] - before == len(first) + 7
    assert run.tokens["turn2"] == hf_greedy(model, second, 8)
    for other in others:
        assert run.tokens[other.request_id] == hf_greedy(model, other.prompt_token_ids, 5)


def test_the_generic_path_scores_outside_the_steps(tiny_models):
    engine = build_engine(str(tiny_models["gpt2"]), slots=2, max_context=64)
    assert not engine.scores_in_steps and engine.scorer() is not None


def test_a_prefix_a_running_request_holds_is_shared_not_recomputed(tiny_models, reference_models):
    """Requests that share a long system prompt with one already running read its blocks
    (and copy the part of a block it ends in), and still answer exactly."""
    model = reference_models["llama"]
    engine = build_engine(str(tiny_models["llama"]), slots=4, max_context=128)
    rng = random.Random(6)
    system = random_prompt(rng, 40)
    first = system + random_prompt(rng, 5)
    later = [system + random_prompt(rng, rng.randint(1, 8)) for _ in range(3)]
    arrivals = {0: [request("first", first, max_new_tokens=12, ignore_eos=True)],
                3: [request(f"later{i}", prompt, max_new_tokens=6) for i, prompt in enumerate(later[:2])]}
    # A scoring request joins once the others run: it copies the system prompt too.
    run = drive(engine, arrivals, on_step=lambda engine, step: step == 4 and _score(engine, "scored", later[2], top_k=4))
    stats = engine.stats()
    assert stats["prefix_cache_hits"] >= 3 * len(system)
    assert stats["prompt_tokens_computed"] == len(first) + sum(len(p) - len(system) for p in later)
    assert run.tokens["first"] == hf_greedy(model, first, 12)
    for i, prompt in enumerate(later[:2]):
        assert run.tokens[f"later{i}"] == hf_greedy(model, prompt, 6)
    scored = [o for outputs in run.outputs.values() for o in outputs if o.score is not None]
    assert len(scored) == 1
    top = torch.topk(_reference(model, later[2])[-1], 4)
    assert scored[0].score.top_token_ids == top.indices.tolist()
    assert scored[0].score.top_logprobs == pytest.approx(top.values.tolist(), abs=TOLERANCE)


def test_a_step_that_fails_when_read_back_ends_its_scoring_requests_too(tiny_models, monkeypatch):
    """A scoring request whose last rows were in a step that fails to read back gets an
    error, like the generate requests of that step: none is left holding its slot."""
    from batchd.workers.hf import engine as hf_engine

    engine = build_engine(str(tiny_models["llama"]), slots=2, max_context=64)
    rng = random.Random(7)
    engine.add(request("gen", random_prompt(rng, 6), max_new_tokens=4))
    _score(engine, "scored", random_prompt(rng, 8), top_k=2)

    def broken(launched):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(hf_engine._Launched, "read", broken)
    outputs = []
    for _ in range(3):
        outputs += engine.step()
    finished = {o.request_id: o for o in outputs if o.finished}
    assert set(finished) == {"gen", "scored"}
    assert all(o.finish_reason == "error" and "illegal memory access" in o.error.message for o in finished.values())
    assert not engine.has_work() and engine.num_running == 0


def _run_until_idle(engine) -> list:
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    return outputs


def test_a_request_of_many_rows_answers_once_with_every_rows_vector(tiny_models, reference_models):
    model = reference_models["llama"]
    engine = build_engine(str(tiny_models["llama"]), slots=2, max_context=128)  # fewer slots than rows
    prompt = random_prompt(random.Random(4), 20)
    rows = [[], [7], [7, 8, 9], [300]]
    engine.add_score(EngineRequest("many", prompt, SamplingParams()), ScoreItem(prompt, None, None, rows))
    outputs = _run_until_idle(engine)
    assert [o.request_id for o in outputs] == ["many"] and outputs[0].finish_reason == "stop"
    vectors = outputs[0].score.next_token_logprobs
    assert vectors.shape == (4, model.config.vocab_size)
    for row, tokens in enumerate(rows):
        expected = _reference(model, prompt + tokens)[-1]
        assert (vectors[row] - expected).abs().max().item() < TOLERANCE

    # With top_k: each row's k most likely tokens, one row after another, as that row's own call gives.
    engine.add_score(EngineRequest("top", prompt, SamplingParams()), ScoreItem(prompt, None, 3, rows))
    (output,) = _run_until_idle(engine)
    assert output.request_id == "top" and output.score.next_token_logprobs is None
    assert len(output.score.top_token_ids) == len(output.score.top_logprobs) == 3 * len(rows)
    for row, tokens in enumerate(rows):
        expected = torch.topk(_reference(model, prompt + tokens)[-1], 3)
        assert output.score.top_token_ids[3 * row:3 * row + 3] == expected.indices.tolist()
        values = torch.tensor(output.score.top_logprobs[3 * row:3 * row + 3])
        assert (values - expected.values).abs().max().item() < TOLERANCE

    # Cancelled: one answer, for the request, and every row's slot and blocks free again.
    engine.add_score(EngineRequest("gone", prompt, SamplingParams()), ScoreItem(prompt, None, None, rows))
    engine.step()
    engine.cancel("gone")
    outputs = _run_until_idle(engine)
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("gone", "cancelled")]
    assert engine.num_running == engine.num_waiting == 0 and engine.kv_cache_usage == 0


def test_a_pinned_prefix_is_computed_held_and_let_go(tiny_models):
    engine = build_engine(str(tiny_models["llama"]), slots=2, max_context=64, block_size=4,
                          max_pinned_blocks=5)
    prefix = random_prompt(random.Random(6), 18)  # 4 full blocks of 4 tokens
    engine.pin("a" * 32, prefix)
    assert _run_until_idle(engine) == []  # the pin's own prefill answers nobody
    assert engine.pinned_blocks == 4
    from batchd.client.errors import PinLimitReached
    with pytest.raises(PinLimitReached, match="max-pinned-blocks"):
        engine.pin("b" * 32, random_prompt(random.Random(7), 8))  # 2 more: 6 > 5
    # Long requests fill the pool over and over: a request on the prefix still finds it all.
    for index in range(6):
        engine.add(request(f"filler{index}", random_prompt(random.Random(index), 40), max_new_tokens=8))
    _run_until_idle(engine)
    hits = engine.stats()["prefix_cache_hits"]
    _score(engine, "on-pin", prefix + [9])
    _run_until_idle(engine)
    assert engine.stats()["prefix_cache_hits"] - hits == 16
    engine.unpin("a" * 32)
    assert engine.pinned_blocks == 0 and engine.kv_cache_usage == 0
