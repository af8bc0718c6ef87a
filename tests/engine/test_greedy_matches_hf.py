"""Greedy output equals Hugging Face generate token for token, whatever the batch mates."""

from __future__ import annotations

import random

import pytest
from batchd.workers.hf import build_engine
from engine_helpers import EOS, drive, hf_greedy, random_prompt, request


def _random_workload(seed: int, count: int, max_prompt: int, max_new: int):
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    prompts = {}
    for index in range(count):
        prompt = random_prompt(rng, rng.randint(1, max_prompt))
        new_tokens = rng.randint(1, max_new)
        # Some arrive together at the start, the rest while others are mid-decode.
        step = 0 if index < count // 3 else rng.randint(1, 40)
        req = request(f"r{index}", prompt, max_new_tokens=new_tokens)
        arrivals.setdefault(step, []).append(req)
        prompts[req.request_id] = (prompt, new_tokens)
    return arrivals, prompts


# Uncompiled flex is the point on the CPU: the same math the GPU compiles.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind,attention,seed,burst", [
    ("llama", "sdpa", 0, None), ("llama", "sdpa", 1, None), ("qwen3", "sdpa", 0, None), ("qwen3", "sdpa", 1, None),
    ("llama", "flex", 2, None), ("qwen3", "flex", 3, None), ("qwen2", "sdpa", 4, None), ("llama", "sdpa", 5, 40)])
def test_random_mix_matches_generate(tiny_models, reference_models, kind, attention, seed, burst):
    # Few slots and a small prefill budget: slots are reused, prompts are chunked,
    # and prefill pieces share steps with running decodes. "flex" is the GPU's
    # decode attention, run here without compilation. With a burst budget the pieces'
    # sizes change from step to step with the backlog.
    engine = build_engine(str(tiny_models[kind]), slots=3, max_context=128, max_prefill_tokens=13,
                          burst_prefill_tokens=burst, attention=attention)
    arrivals, prompts = _random_workload(seed, count=14, max_prompt=60, max_new=24)
    run = drive(engine, arrivals)
    assert set(run.finish) == set(prompts)
    for request_id, (prompt, new_tokens) in prompts.items():
        expected = hf_greedy(reference_models[kind], prompt, new_tokens)
        assert run.tokens[request_id] == expected, request_id
        assert run.finish[request_id] == ("stop" if expected[-1] == EOS else "length")


def test_batch_mates_do_not_change_output(tiny_models, reference_models):
    """The same request alone and among 7 others in 8 slots gives the same tokens."""
    rng = random.Random(7)
    probe = random_prompt(rng, 20)
    alone = drive(build_engine(str(tiny_models["llama"]), slots=8, max_context=128),
                  {0: [request("probe", probe, max_new_tokens=30)]})
    crowd = {0: [request(f"m{i}", random_prompt(rng, rng.randint(1, 50)), max_new_tokens=rng.randint(1, 40))
                 for i in range(7)]}
    crowd[3] = [request("probe", probe, max_new_tokens=30)]
    crowded = drive(build_engine(str(tiny_models["llama"]), slots=8, max_context=128), crowd)
    assert crowded.tokens["probe"] == alone.tokens["probe"] == hf_greedy(reference_models["llama"], probe, 30)


def test_generic_path_matches_generate(tiny_models, reference_models):
    engine = build_engine(str(tiny_models["gpt2"]), slots=2, max_context=128, max_prefill_tokens=8)
    assert type(engine._runner).__name__ == "GenericRunner"
    arrivals, prompts = _random_workload(3, count=5, max_prompt=20, max_new=10)
    run = drive(engine, arrivals)
    for request_id, (prompt, new_tokens) in prompts.items():
        assert run.tokens[request_id] == hf_greedy(reference_models["gpt2"], prompt, new_tokens), request_id


def _varlen_reference(q, k, v, cu_queries, cu_keys, longest_query, longest_key, scale):
    """What varlen flash attention computes (it has no CPU kernel): each piece's queries are
    the last of its keys and attend causally, aligned to the end."""
    import torch
    import torch.nn.functional as F

    queries, keys = cu_queries.tolist(), cu_keys.tolist()
    assert max(b - a for a, b in zip(queries, queries[1:])) == longest_query
    assert max(b - a for a, b in zip(keys, keys[1:])) == longest_key
    out = []
    for (q0, q1), (k0, k1) in zip(zip(queries, queries[1:]), zip(keys, keys[1:])):
        qs = q[q0:q1].transpose(0, 1)[None]
        ks, vs = (t[k0:k1].transpose(0, 1)[None] for t in (k, v))
        mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(k1 - k0 - (q1 - q0))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                                  enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_prompt_pieces_packed_into_one_attention_call_match_generate(tiny_models, reference_models, kind):
    """On a GPU a step's prompt pieces, fresh or continuing a cached prefix, share one varlen
    attention call; the packing (token order, key gathers, bounds) is checked here with a CPU
    stand-in for the kernel."""
    from batchd.workers.hf.attention import VarlenPrefill

    engine = build_engine(str(tiny_models[kind]), slots=4, max_context=128, max_prefill_tokens=50)
    scale = engine._runner._scale
    calls = []

    def varlen(q, k, v, cu_queries, cu_keys, longest_query, longest_key):
        calls.append((len(cu_queries) - 1, (cu_keys - cu_queries).tolist()))
        return _varlen_reference(q, k, v, cu_queries, cu_keys, longest_query, longest_key, scale)

    engine._runner.prefill_attention = VarlenPrefill(varlen)
    arrivals, prompts = _random_workload(4, count=12, max_prompt=60, max_new=12)
    run = drive(engine, arrivals)
    for request_id, (prompt, new_tokens) in prompts.items():
        assert run.tokens[request_id] == hf_greedy(reference_models[kind], prompt, new_tokens), request_id
    assert max(pieces for pieces, _ in calls) > 1  # several pieces did share a call
    assert any(max(prefix) > 0 for _, prefix in calls)  # and some continued a prompt cut by the budget


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2"])
def test_fused_projections_share_the_model_weights_memory(tiny_models, kind):
    """The fast path reads q/k/v and gate/up as one weight each; the model's own modules
    (scoring, the generic forward) keep views into it, so no weight is held twice."""
    engine = build_engine(str(tiny_models[kind]), slots=2, max_context=64)
    runner = engine._runner
    assert runner._qkv_sizes is not None
    for layer in runner._layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert attention.q_proj.weight.data_ptr() == attention.fused_qkv.data_ptr()
        assert attention.v_proj.weight.untyped_storage().data_ptr() == attention.fused_qkv.untyped_storage().data_ptr()
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.fused_gate_up.untyped_storage().data_ptr()
        assert "fused_qkv" not in attention.state_dict()  # checkpoints saved from the model stay as they were
        if kind == "qwen2":  # q, k and v biases are fused the same way
            assert attention.k_proj.bias.untyped_storage().data_ptr() == attention.fused_qkv_bias.untyped_storage().data_ptr()
        else:
            assert attention.fused_qkv_bias is None


def test_a_prefill_kernel_that_fails_at_start_is_turned_off_not_fatal(tiny_models, reference_models, caplog):
    """A torch whose varlen attention rejects the call must leave a worker that serves on the
    one-call-per-piece path, not one that fails every prompt."""
    from batchd.workers.hf.attention import PagedSdpa, VarlenPrefill

    engine = build_engine(str(tiny_models["llama"]), slots=2, max_context=64)
    runner = engine._runner

    def broken(*args, **kwargs):
        raise RuntimeError("varlen_attn() got an unexpected keyword argument")

    runner.prefill_attention = VarlenPrefill(broken)
    runner._check_prefill()
    assert isinstance(runner.prefill_attention, PagedSdpa) and "varlen attention failed" in caplog.text
    prompt = random_prompt(random.Random(9), 12)
    run = drive(engine, {0: [request("after", prompt, max_new_tokens=6)]})
    assert run.tokens["after"] == hf_greedy(reference_models["llama"], prompt, 6)
