"""--kv-dtype fp8: the KV pool in float8 e4m3 with per-layer scales.

On the CPU the pool is read through the exact (sdpa) path, dequantized; the GPU's
flex path reads float8 in place and is checked against it where a GPU is (the device
machine: `. benchmarks/gpu_setup.sh; python3 -m pytest tests/engine/test_fp8_kv.py`)."""

from __future__ import annotations

import random

import pytest
import torch
from batchd.workers.hf import build_engine
from batchd.workers.hf.kv_cache import FP8, FP8_MAX, KVPool, to_fp8
from engine_helpers import drive, random_prompt, request

needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="flex's float8 path needs a GPU of compute capability 8.9+")


def test_a_float8_pool_returns_what_it_stored_rounded_and_copies_blocks():
    pool = KVPool(2, num_blocks=4, block_size=8, kv_heads=2, head_dim=16, dtype=torch.float32,
                  device=torch.device("cpu"), storage=FP8)
    full = KVPool(2, num_blocks=4, block_size=8, kv_heads=2, head_dim=16, dtype=torch.float32,
                  device=torch.device("cpu"))
    assert pool.keys.dtype == FP8 and pool.bytes * 4 == full.bytes
    assert pool.values.stride()[-2] == 1  # column-major values, as flex's float8 product takes them
    pool.key_scales[1], pool.value_scales[1] = 0.05, 0.01
    torch.manual_seed(0)
    keys, values = torch.randn(5, 2, 16) * 3, torch.randn(5, 2, 16) * 0.5
    where = torch.tensor([9, 10, 11, 3, 30])
    pool.write(1, where, keys, values)
    got_keys, got_values = pool.gather(1, where)
    torch.testing.assert_close(got_keys, to_fp8(keys, 0.05).float() * 0.05, rtol=0, atol=0)
    torch.testing.assert_close(got_values, to_fp8(values, 0.01).float() * 0.01, rtol=0, atol=0)
    assert 0 < (got_keys - keys).abs().max() < 0.07 * keys.abs().max()  # e4m3: 3 mantissa bits
    pool.copy([(1, 2, 3)])  # block 1's first 3 positions (8, 9, 10) into block 2's
    copied, source = pool.gather(1, torch.tensor([16, 17, 18])), pool.gather(1, torch.tensor([8, 9, 10]))
    torch.testing.assert_close(copied, source, rtol=0, atol=0)
    torch.testing.assert_close(copied[1][1:], got_values[:2], rtol=0, atol=0)


def test_values_past_the_calibrated_range_saturate_instead_of_overflowing():
    pool = KVPool(1, num_blocks=2, block_size=8, kv_heads=1, head_dim=4, dtype=torch.float32,
                  device=torch.device("cpu"), storage=FP8)
    with pool.calibrating():
        pool.write(0, torch.tensor([0]), torch.full((1, 1, 4), 2.0), torch.full((1, 1, 4), -0.5))
    assert pool.key_scales == [2.0 / (FP8_MAX / 2)] and pool.value_scales == [0.5 / (FP8_MAX / 2)]
    pool.write(0, torch.tensor([1]), torch.full((1, 1, 4), 1e6), torch.full((1, 1, 4), -1e6))
    keys, values = pool.gather(0, torch.tensor([1]))
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    assert torch.allclose(keys, torch.tensor(4.0)) and torch.allclose(values, torch.tensor(-1.0))


def test_a_float8_pool_holds_its_dtypes_share_more_tokens_in_the_same_memory(tiny_models):
    memory = 64 * 1024
    plain = build_engine(str(tiny_models["llama"]), slots=4, kv_memory=memory, dtype="float32", device="cpu")
    fp8 = build_engine(str(tiny_models["llama"]), slots=4, kv_memory=memory, dtype="float32", device="cpu",
                       kv_dtype="fp8")
    assert fp8.kv_dtype == "float8_e4m3fn" and plain.kv_dtype == "float32"
    # float32 to float8: four times the blocks (bf16 on a GPU: twice) in the same bytes;
    # one block of each pool is the scratch block, which no request holds.
    block = 16
    assert fp8.kv_cache_bytes == plain.kv_cache_bytes <= memory
    assert fp8.kv_cache_tokens + block == 4 * (plain.kv_cache_tokens + block)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_engine_over_a_float8_pool_computes_what_rounding_its_keys_and_values_computes(tiny_models, kind):
    """Greedy tokens through a float8 pool (shared prefixes, pieces, a pool small enough to
    preempt) equal those of the same engine over a float32 pool whose writes are rounded
    through float8 with the same scales: the pool adds that rounding and nothing else."""
    options = dict(slots=4, max_context=128, kv_memory=None, max_prefill_tokens=24, dtype="float32", device="cpu")
    fp8 = build_engine(str(tiny_models[kind]), kv_dtype="fp8", **options)
    reference = build_engine(str(tiny_models[kind]), **options)
    pool, plain = fp8._runner.pool, reference._runner.pool
    assert pool.quantized and set(pool.key_scales) != {1.0}  # calibrated at start
    store = plain.store  # what a pool in the model's dtype writes through (in the projection)

    def rounded(layer_kv, index, keys, values):
        layer = next(i for i in range(len(pool.key_scales)) if plain.keys[i].data_ptr() == layer_kv[0].data_ptr())
        store(layer_kv, index, to_fp8(keys, pool.key_scales[layer]).float() * pool.key_scales[layer],
              to_fp8(values, pool.value_scales[layer]).float() * pool.value_scales[layer])

    plain.store = rounded
    rng = random.Random(21)
    shared = random_prompt(rng, 20)
    arrivals = {0: [request(f"a{i}", shared + random_prompt(rng, rng.randint(1, 15)), max_new_tokens=14)
                    for i in range(5)],
                6: [request(f"b{i}", random_prompt(rng, rng.randint(1, 40)), max_new_tokens=9) for i in range(3)]}
    expected = drive(reference, arrivals).tokens
    got = drive(fp8, arrivals).tokens
    assert got == expected


def test_fp8_kv_is_refused_where_it_cannot_run(tiny_models, monkeypatch):
    with pytest.raises(ValueError, match="needs a GPU"):
        build_engine(str(tiny_models["llama"]), slots=2, max_context=64, dtype="float32", device="cpu",
                     attention="flex", kv_dtype="fp8")
    with pytest.raises(ValueError, match="paged path"):
        build_engine(str(tiny_models["gpt2"]), slots=2, max_context=64, dtype="float32", device="cpu", kv_dtype="fp8")
    with pytest.raises(ValueError, match="not one of auto, fp8"):
        build_engine(str(tiny_models["llama"]), slots=2, max_context=64, dtype="float32", device="cpu", kv_dtype="int4")


@needs_fp8_gpu
def test_flex_decoding_over_a_float8_pool_is_close_to_the_exact_path():
    """The GPU's decode path (queries cast to float8, scales on the scores and the output)
    against the exact path over the same pool dequantized. flex's float8 path also rounds
    the queries, the softmax weights and its output to float8 (3 mantissa bits each): on an
    H200 the mean difference was 5.3% of the mean output; a wrong scale or block is ~100%."""
    from types import SimpleNamespace

    from batchd.workers.hf.attention import FlexPagedDecode, PagedSdpa

    device = torch.device("cuda")
    rows, blocks_each, block, kv_heads, heads, dim = 8, 4, 128, 2, 4, 64
    pool = KVPool(1, rows * blocks_each + 1, block, kv_heads, dim, torch.bfloat16, device, storage=FP8)
    pool.key_scales[0], pool.value_scales[0] = 0.02, 0.005
    table = torch.arange(1, rows * blocks_each + 1, dtype=torch.int32, device=device).view(rows, blocks_each)
    logical = torch.zeros(rows * blocks_each + 1, dtype=torch.int32, device=device)
    logical[1:] = torch.arange(blocks_each, dtype=torch.int32, device=device).repeat(rows)
    lengths = torch.randint(1, blocks_each * block, (rows,), dtype=torch.int32, device=device)
    torch.manual_seed(0)
    tokens = pool.num_blocks * block
    pool.write(0, torch.arange(tokens, device=device), torch.randn(tokens, kv_heads, dim, device=device) * 3,
               torch.randn(tokens, kv_heads, dim, device=device) * 0.6)
    q = torch.randn(rows, heads, dim, device=device, dtype=torch.bfloat16)
    flex = FlexPagedDecode(rows, table, logical, block, tokens, heads, dim, dim ** -0.5, device, torch.bfloat16,
                           compile=True)
    batch = SimpleNamespace(slot_lengths=lengths, row_layout=False, decode_all_slots=True, num_decodes=rows)
    flex.prepare(batch)
    got = flex.decode(q, pool, 0, batch).float()
    exact = PagedSdpa(heads, kv_heads, dim, dim ** -0.5)
    span = torch.arange(int(lengths.max()), device=device)
    at = torch.minimum(span[None], lengths[:, None].long() - 1)
    physical = table.long()[torch.arange(rows, device=device)[:, None], at // block] * block + at % block
    exact_batch = SimpleNamespace(decode_gather=physical, decode_mask=(span[None] < lengths[:, None])[:, None, None])
    expected = exact.decode(q, pool, 0, exact_batch).float()
    assert (got - expected).abs().mean() < 0.08 * expected.abs().mean()
