"""--quantize fp8: float8 weights with per-channel scales, products that read float8.

torch's scaled product runs on the CPU too, so the numbers here are the ones a GPU
computes up to summation order; the weight-only Triton kernel that takes a GPU's products
of few rows runs here under Triton's interpreter. Speed is benchmarks/quantized_gpu.py's
and fp8_probe.py's on an H200."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from batchd.workers.hf import build_engine
from batchd.workers.hf.models import load_model, weight_bytes
from batchd.workers.hf import fp8_matvec, quant
from batchd.workers.hf.quant import FP8, Fp8Linear, fp8_supported, quantize_rows
from engine_helpers import drive, hf_greedy, random_prompt, request


@pytest.mark.parametrize("activation_scales", ["tensor", "row", "row_kernel"])
def test_fp8_linear_is_the_product_of_its_quantized_operands(monkeypatch, activation_scales):
    monkeypatch.setattr(quant, "ACTIVATION_SCALES", activation_scales)
    torch.manual_seed(0)
    full = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(2, 5, 64)
    layer = Fp8Linear.from_linear(full)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (48,)
    if activation_scales.startswith("row"):
        q, scale = quantize_rows(x.reshape(-1, 64))
    else:  # one scale for every row
        scale = x.abs().max() / quant.FP8_MAX
        q = (x.reshape(-1, 64) / scale).to(FP8)
    expected = (q.float() * scale) @ layer.dequantized().t() + full.bias
    out = layer(x)
    assert out.shape == (2, 5, 48)
    torch.testing.assert_close(out.reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    # e4m3 keeps 3 mantissa bits: each operand within ~6%, the product well inside 10%.
    relative = (out - full(x)).norm() / full(x).norm()
    assert 0 < relative < 0.1


def test_a_row_of_zeros_quantizes_to_zeros():
    q, scale = quantize_rows(torch.zeros(2, 32))
    assert torch.isfinite(scale).all() and (q.float() == 0).all()


def test_fp8_weights_take_a_quarter_of_float32(tiny_models):
    full = load_model(str(tiny_models["llama"]), dtype="fp32", device="cpu")
    quantized = load_model(str(tiny_models["llama"]), dtype="fp32", device="cpu", quantize="fp8")
    assert quantized.weights.startswith("float8 e4m3")
    assert isinstance(quantized.model.model.layers[0].mlp.down_proj, Fp8Linear)
    # The output head stays in the model's dtype: its rounding would move every logit.
    assert type(quantized.model.lm_head) is torch.nn.Linear and quantized.model.lm_head.weight.dtype == torch.float32
    linear = sum(m.weight.numel() for name, m in full.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    saved = weight_bytes(full.model) - weight_bytes(quantized.model)
    assert 0.7 * linear * 3 < saved <= linear * 3


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fp8_engine_matches_generate_of_the_same_fp8_model(tiny_models, kind, monkeypatch):
    """The engine fuses q/k/v and gate/up into one float8 product each (weights and scales
    concatenated); transformers' forward runs them one by one: the tokens must agree.
    The default scales activations per row, which is batch-invariant, so requests share steps here."""
    assert quant.ACTIVATION_SCALES == "row"
    reference = load_model(str(tiny_models[kind]), dtype="float32", device="cpu", quantize="fp8").model
    engine = build_engine(str(tiny_models[kind]), slots=3, max_context=128, max_prefill_tokens=16,
                          quantize="fp8", dtype="float32", device="cpu")
    attention = engine._runner._layers[0].self_attn
    assert attention.fused_qkv.dtype == FP8 and attention.fused_qkv_scale.shape == attention.fused_qkv.shape[:1]
    rng = random.Random(5)
    prompts = {f"r{i}": random_prompt(rng, rng.randint(1, 40)) for i in range(7)}
    run = drive(engine, {0: [request(rid, p, max_new_tokens=12) for rid, p in prompts.items()]})
    for request_id, prompt in prompts.items():
        assert run.tokens[request_id] == hf_greedy(reference, prompt, 12), request_id


def test_tensor_scaled_fp8_matches_generate_one_request_at_a_time(tiny_models, monkeypatch):
    """One scale for a step's activations makes a request's tokens depend on what shares
    its steps; alone, with its prompt in one piece, it is generate's."""
    monkeypatch.setattr(quant, "ACTIVATION_SCALES", "tensor")
    reference = load_model(str(tiny_models["llama"]), dtype="float32", device="cpu", quantize="fp8").model
    engine = build_engine(str(tiny_models["llama"]), slots=3, max_context=128, max_prefill_tokens=64,
                          quantize="fp8", dtype="float32", device="cpu")
    rng = random.Random(6)
    for i in range(4):
        prompt = random_prompt(rng, rng.randint(1, 40))
        run = drive(engine, {0: [request(f"r{i}", prompt, max_new_tokens=12)]})
        assert run.tokens[f"r{i}"] == hf_greedy(reference, prompt, 12), i


def test_fp8_is_refused_on_a_gpu_without_float8_products(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    reason = fp8_supported(torch.device("cuda", 0))
    assert "compute capability 8.9" in reason and "A100" in reason and "8.0" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_supported(torch.device("cuda", 0)) is None
    assert fp8_supported(torch.device("cpu")) is None



# Run in a child process: TRITON_INTERPRET must be set before triton is first imported.
# float32 activations, since the interpreter's dot mishandles bf16. Each case is
# (rows, out, in, bias, BLOCK_N, BLOCK_K, SPLIT_K); sizes that are not multiples of the
# blocks exercise the masks, and the last has more splits than K has chunks.
_INTERPRETED = """
import json, sys, torch, triton
from batchd.workers.hf import fp8_matvec
from batchd.workers.hf.quant import quantize_rows
torch.manual_seed(0)
errors = []
for rows, outs, ins, bias, block_n, block_k, split in json.loads(sys.argv[1]):
    weight, scale = quantize_rows(torch.randn(outs, ins))
    scale = scale.squeeze(1).contiguous()
    b = torch.randn(outs) if bias else None
    x = torch.randn(rows, ins)
    config = triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split}, num_warps=4, num_stages=1)
    out = fp8_matvec.launch(x, weight, scale, b, config)
    expected = x @ (weight.float() * scale[:, None]).t() + (0 if b is None else b)
    errors.append([list(out.shape), str(out.dtype), ((out - expected).abs().max() / expected.abs().max()).item()])
print(json.dumps(errors))
"""
_CASES = [(1, 48, 80, False, 32, 32, 1), (3, 64, 96, True, 32, 32, 2), (16, 40, 160, True, 16, 32, 4),
          (8, 64, 128, True, 64, 64, 8)]


def test_weight_only_kernel_under_the_interpreter_is_the_dequantized_product():
    pytest.importorskip("triton", reason="Triton is not installed (the test extra has it on x86-64 Linux)")
    done = subprocess.run([sys.executable, "-c", _INTERPRETED, json.dumps(_CASES)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (rows, outs, *_), (shape, dtype, error) in zip(_CASES, results, strict=True):
        assert shape == [rows, outs] and dtype == "torch.float32"
        assert error < 1e-5, (rows, outs, error)  # float32 throughout: only the summation order differs


def test_few_rows_take_the_weight_only_kernel_where_it_runs(monkeypatch):
    """1 to MAX_ROWS rows go to the kernel, more to torch._scaled_mm; FEW_ROWS_KERNEL =
    "scaled_mm" sends every size there."""
    kernel_rows, scaled_mm_calls = [], []
    scaled_mm = torch._scaled_mm

    def kernel(x, weight, scale, bias=None):
        kernel_rows.append(x.shape[0])
        return x.new_zeros(x.shape[0], weight.shape[0])

    def counted_scaled_mm(*args, **kwargs):
        scaled_mm_calls.append(args[0].shape[0])
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(quant, "FEW_ROWS_KERNEL", "weight_only")
    monkeypatch.setattr(fp8_matvec, "available", lambda device: True)
    monkeypatch.setattr(fp8_matvec, "fp8_weight_only_linear", kernel, raising=False)  # absent without Triton
    monkeypatch.setattr(torch, "_scaled_mm", counted_scaled_mm)
    layer = Fp8Linear.from_linear(torch.nn.Linear(32, 16))
    for rows in (1, 7, 16, 17, 40):
        assert layer(torch.randn(1, rows, 32)).shape == (1, rows, 16)
    assert kernel_rows == [1, 7, 16] and scaled_mm_calls == [17, 40]
    monkeypatch.setattr(quant, "FEW_ROWS_KERNEL", "scaled_mm")
    layer(torch.randn(3, 32))
    assert kernel_rows == [1, 7, 16] and scaled_mm_calls == [17, 40, 3]
