"""The paged KV cache through the engine: shared prefix blocks, eviction and preemption leave
every request's tokens exactly what Hugging Face generate gives it alone."""

from __future__ import annotations

import random

import pytest
from batchd.workers.hf import build_engine
from engine_helpers import drive, hf_greedy, random_prompt, request

# The tiny llama and qwen3 both hold 512 bytes a token (2 layers, k and v, 64 floats); blocks of 16.
BLOCK_BYTES = 16 * 512


def _engine(tiny_models, kind="llama", blocks=None, **options):
    options.setdefault("max_context", 128)
    if blocks is not None:
        options["kv_memory"] = (blocks + 1) * BLOCK_BYTES  # one more: the scratch block
    return build_engine(str(tiny_models[kind]), **options)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "flex")])
def test_a_pool_too_small_for_the_batch_preempts_and_every_token_is_exact(tiny_models, reference_models, kind,
                                                                           attention):
    # 12 blocks of 16 tokens for 6 requests that each grow to 3-5 blocks: the youngest are
    # preempted, their blocks (mostly still cached) read back when they resume.
    engine = build_engine(str(tiny_models[kind]), slots=6, max_context=128, max_prefill_tokens=24,
                          attention=attention, block_size=16, kv_memory=13 * BLOCK_BYTES)
    rng = random.Random(21)
    prompts = {f"p{i}": (random_prompt(rng, rng.randint(20, 40)), rng.randint(18, 30)) for i in range(6)}
    run = drive(engine, {0: [request(rid, prompt, max_new_tokens=n, ignore_eos=True)
                             for rid, (prompt, n) in prompts.items()]})
    assert engine.stats()["num_preemptions"] > 0
    for request_id, (prompt, new_tokens) in prompts.items():
        assert run.tokens[request_id] == hf_greedy(reference_models[kind], prompt, new_tokens), request_id
    assert engine.kv_cache_usage == 0 and not engine.has_work()


def test_shared_prefixes_and_eviction_leave_the_output_exact(tiny_models, reference_models):
    """Requests arriving over time with a few system prompts among them (blocks shared while
    running, cached and found after), in a pool small enough that cached blocks are evicted."""
    engine = _engine(tiny_models, blocks=14, slots=4, max_prefill_tokens=20)
    rng = random.Random(5)
    systems = [random_prompt(rng, n) for n in (19, 35, 48)]
    arrivals, prompts = {}, {}
    for index in range(18):
        prompt = rng.choice(systems) + random_prompt(rng, rng.randint(1, 12))
        new_tokens = rng.randint(2, 16)
        arrivals.setdefault(rng.randint(0, 60), []).append(request(f"s{index}", prompt, max_new_tokens=new_tokens))
        prompts[f"s{index}"] = (prompt, new_tokens)
    run = drive(engine, arrivals)
    for request_id, (prompt, new_tokens) in prompts.items():
        assert run.tokens[request_id] == hf_greedy(reference_models["llama"], prompt, new_tokens), request_id
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0 and engine._blocks.evictions > 0
    assert stats["prompt_tokens_computed"] + stats["prefix_cache_hits"] == stats["prefix_cache_queries"]


def test_seeded_sampling_gives_the_same_tokens_whether_preempted_or_not(tiny_models):
    rng = random.Random(8)
    prompts = [random_prompt(rng, 30) for _ in range(5)]

    def sample(blocks):
        engine = _engine(tiny_models, blocks=blocks, slots=5)
        run = drive(engine, {0: [request(f"r{i}", p, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=100 + i,
                                         ignore_eos=True) for i, p in enumerate(prompts)]})
        return run.tokens, engine.stats()["num_preemptions"]

    roomy, none = sample(blocks=None)
    tight, some = sample(blocks=11)
    assert none == 0 and some > 0
    assert tight == roomy


def test_a_shared_system_prompt_is_computed_once(tiny_models, reference_models):
    """A long system prompt before many short questions, all arriving at once: the first
    request computes it, the others read its blocks (and copy the few positions of the
    block it ends in) as soon as they are written, in the steps after."""
    engine = _engine(tiny_models, slots=16, max_context=200, max_prefill_tokens=64)
    rng = random.Random(12)
    system = random_prompt(rng, 100)
    # Each question starts with its own token, so none shares more than the system prompt.
    questions = [[3 + i] + random_prompt(rng, rng.randint(2, 8)) for i in range(16)]
    run = drive(engine, {0: [request(f"q{i}", system + q, max_new_tokens=4) for i, q in enumerate(questions)]})
    computed = engine.stats()["prompt_tokens_computed"]
    assert computed == len(system) + sum(map(len, questions))
    for index, question in enumerate(questions[:4]):
        assert run.tokens[f"q{index}"] == hf_greedy(reference_models["llama"], system + question, 4)
