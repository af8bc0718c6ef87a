"""Weights in less memory: --dtype aliases and weight-only int8 (torchao)."""

from __future__ import annotations

import random

import pytest
import torch
from batchd.workers.hf import build_engine
from batchd.workers.hf.models import load_model, weight_bytes
from engine_helpers import drive, hf_greedy, random_prompt, request

pytest.importorskip("torchao", reason="int8 weights need torchao (the int8 extra)")


def test_int8_stores_linear_weights_in_a_quarter_of_the_memory(tiny_models):
    full = load_model(str(tiny_models["llama"]), dtype="fp32", device="cpu")
    quantized = load_model(str(tiny_models["llama"]), dtype="fp32", device="cpu", quantize="int8")
    assert quantized.weights == "int8 (float32 activations)" and full.weights == "float32"
    q_proj = quantized.model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.qdata.dtype == torch.int8
    # The output head stays in float: its rounding would move every logit.
    assert quantized.model.lm_head.weight.dtype == torch.float32 and not hasattr(quantized.model.lm_head.weight, "qdata")
    linear = sum(m.weight.numel() for name, m in full.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    saved = weight_bytes(full.model) - weight_bytes(quantized.model)
    # 4 bytes become 1 per weight, plus one float scale per output channel.
    assert 0.7 * linear * 3 < saved <= linear * 3


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_int8_engine_matches_generate_of_the_same_int8_model(tiny_models, kind):
    reference = load_model(str(tiny_models[kind]), dtype="float32", device="cpu", quantize="int8").model
    engine = build_engine(str(tiny_models[kind]), slots=3, max_context=128, max_prefill_tokens=16,
                          quantize="int8", dtype="float32", device="cpu")
    rng = random.Random(4)
    prompts = {f"r{i}": random_prompt(rng, rng.randint(1, 40)) for i in range(7)}
    run = drive(engine, {0: [request(rid, p, max_new_tokens=12) for rid, p in prompts.items()]})
    for request_id, prompt in prompts.items():
        assert run.tokens[request_id] == hf_greedy(reference, prompt, 12), request_id


def test_unknown_dtype_and_quantization_are_refused(tiny_models):
    with pytest.raises(ValueError, match="dtype 'int4'"):
        load_model(str(tiny_models["llama"]), dtype="int4", device="cpu")
    with pytest.raises(ValueError, match="quantize 'int4'"):
        load_model(str(tiny_models["llama"]), device="cpu", quantize="int4")
