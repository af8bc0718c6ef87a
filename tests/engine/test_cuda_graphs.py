"""Decode steps replay CUDA graphs of several sizes: the smallest that holds the step's
decoding requests. Which rows go to which slots is checked here on the CPU; the graphs
themselves need a GPU, and the tests that replay them run where one is (the device
machine: `. benchmarks/gpu_setup.sh; python3 -m pytest tests/engine/test_cuda_graphs.py`).
"""

from __future__ import annotations

import random

import pytest
import torch
from batchd.workers.hf import build_engine
from batchd.workers.hf.graphs import DecodeGraph, check_graph_sizes, decode_graph_sizes, graphs_worth_keeping
from batchd.workers.hf.scheduler import Chunk
from engine_helpers import EOS, drive, random_prompt, request

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_graph_sizes_are_powers_of_two_from_8_and_all_slots():
    assert decode_graph_sizes(256) == (8, 16, 32, 64, 128, 256)
    assert decode_graph_sizes(100) == (8, 16, 32, 64, 100)
    assert decode_graph_sizes(8) == (8,)
    assert decode_graph_sizes(3) == (3,)


def test_chosen_sizes_always_include_every_slot():
    assert check_graph_sizes((16, 4), 32) == (4, 16, 32)
    with pytest.raises(ValueError, match="between 1 and the 32 slots"):
        check_graph_sizes((64,), 32)


def test_a_smaller_graph_is_kept_only_where_it_replays_faster():
    # Llama-3-8B-like: fewer rows, less time. Qwen3-0.6B-like: the same time for any rows,
    # and the 128-row graph slower than the one over all 256 slots.
    big = {8: 6.6, 16: 6.8, 32: 7.2, 64: 8.3, 128: 10.0, 256: 14.1}
    small = {8: 2.70, 16: 2.75, 32: 2.80, 64: 2.82, 128: 2.95, 256: 2.85}
    assert graphs_worth_keeping(big, 256) == [8, 16, 32, 64, 128, 256]
    assert graphs_worth_keeping(small, 256) == [8, 16, 256]
    assert graphs_worth_keeping({4: 1.0}, 4) == [4]


def test_small_graph_gives_each_row_its_own_slot():
    graph = DecodeGraph(rows=8, slots=32, device=torch.device("cpu"))
    chunks = [Chunk(slot, [5], 10) for slot in (30, 3, 17)]
    row_of, slot_of_row = graph.assign(chunks)
    assert row_of == {30: 0, 3: 1, 17: 2}
    # The rows past the requests take idle slots, each a different one, never a busy one:
    # two rows on one slot would write its query and key twice.
    assert slot_of_row[:3] == [30, 3, 17]
    assert len(slot_of_row) == 8 and len(set(slot_of_row)) == 8
    assert not {30, 3, 17} & set(slot_of_row[3:])


def test_graph_over_every_slot_reads_row_i_as_slot_i():
    graph = DecodeGraph(rows=4, slots=4, device=torch.device("cpu"))
    row_of, slot_of_row = graph.assign([Chunk(2, [5], 10), Chunk(0, [6], 3)])
    assert row_of == {2: 2, 0: 0} and slot_of_row == []
    assert graph.batch.decode_all_slots


def _count_replays(runner) -> dict[int, int]:
    counts = {graph.rows: 0 for graph in runner.graphs.graphs}
    for graph in runner.graphs.graphs:
        replay = graph.graph.replay

        def counted(rows=graph.rows, replay=replay):
            counts[rows] += 1
            replay()

        graph.graph.replay = counted
    return counts


def _greedy_on(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@needs_cuda
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind,compile_decode", [("qwen3", True), ("llama", False)])
def test_every_graph_size_matches_generate(tiny_models, reference_models, kind, compile_decode):
    """20 requests through 16 slots, arriving in waves with outputs of 1-40 tokens: decode steps
    run from 16 requests down to 1, through both graphs (8 and 16 rows), float32, and every
    request's tokens equal generate's on the same GPU."""
    engine = build_engine(str(tiny_models[kind]), slots=16, max_context=128, max_prefill_tokens=64,
                          device="cuda", dtype="float32", compile_decode=compile_decode, cuda_graph_sizes=(8, 16))
    runner = engine._runner
    assert runner.graphs.sizes == [8, 16]
    replays = _count_replays(runner)
    rng = random.Random(11)
    arrivals, expected = {}, {}
    reference = reference_models[kind].to("cuda")
    try:
        for index in range(20):
            prompt = random_prompt(rng, rng.randint(1, 50))
            new_tokens = rng.randint(1, 40)
            step = 0 if index < 12 else rng.randint(1, 60)
            arrivals.setdefault(step, []).append(request(f"g{index}", prompt, max_new_tokens=new_tokens))
            expected[f"g{index}"] = _greedy_on(reference, prompt, new_tokens)
    finally:
        reference.to("cpu")
    run = drive(engine, arrivals)
    assert set(run.finish) == set(expected)
    for request_id, tokens in expected.items():
        assert run.tokens[request_id] == tokens, request_id
        assert run.finish[request_id] == ("stop" if tokens[-1] == EOS else "length")
    assert replays[8] > 0 and replays[16] > 0, replays


@needs_cuda
def test_default_graphs_always_cover_every_slot(tiny_models):
    """By default the smaller graphs are timed at start and kept only where they are faster;
    the graph over every slot always stays, so every decode step has one."""
    engine = build_engine(str(tiny_models["llama"]), slots=32, max_context=128, device="cuda", dtype="float32",
                          compile_decode=False)
    sizes = engine._runner.graphs.sizes
    assert sizes[-1] == 32 and set(sizes) <= set(decode_graph_sizes(32))
    rng = random.Random(5)
    run = drive(engine, {0: [request(f"d{i}", random_prompt(rng, 10), max_new_tokens=5) for i in range(3)]})
    assert all(len(tokens) == 5 or tokens[-1] == EOS for tokens in run.tokens.values()) and len(run.finish) == 3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_a_prompt_carrying_step_through_the_mixed_graphs_buffers_matches_the_eager_step(tiny_models):
    """A mixed graph's step (every slot's decode row, prompt pieces packed, the padding as one
    more piece, keys gathered into fixed buffers) computes what the eager step computes, for
    fresh prompts and prompts continuing a cached prefix. On the CPU the buffers run uncaptured."""
    from batchd.workers.hf.graphs import MixedGraph

    engine = build_engine(str(tiny_models["llama"]), slots=4, max_context=128, max_prefill_tokens=24,
                          attention="flex", block_size=16, overlap=False, device="cpu")
    runner = engine._runner
    forward = runner.forward
    compared = []

    def both(chunks, previous=None):
        logits, rows = forward(chunks, previous)
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        pieces = [c for c in chunks if len(c.token_ids) > 1]
        graph = MixedGraph(runner.slots, 32, 512, 128, runner.device)
        if pieces and graph.fits(pieces):
            with torch.inference_mode():  # as forward runs it
                graph.fill(runner, decodes, pieces, previous)
                mixed = graph.run(runner).float()
            wanted = [c for c in decodes if c.logit_rows()] + [c for c in pieces if c.logit_rows()]
            mixed = mixed[:len(wanted)]
            eager = {id(chunk): row for chunk, row in zip(rows, logits)}
            for chunk, row in zip(wanted, mixed):
                assert torch.allclose(row, eager[id(chunk)], atol=1e-4), chunk
            compared.append((len(decodes), [(c.start, len(c.token_ids)) for c in pieces]))
        return logits, rows

    runner.forward = both
    rng = random.Random(13)
    shared = random_prompt(rng, 30)
    arrivals = {0: [request("a", shared + random_prompt(rng, 5), max_new_tokens=12)],
                4: [request("b", shared + random_prompt(rng, 9), max_new_tokens=6),
                    request("c", random_prompt(rng, 40), max_new_tokens=6)]}
    drive(engine, arrivals)
    assert any(decodes and pieces for decodes, pieces in compared)  # decode rows beside prompt pieces
    assert any(start > 0 for _, pieces in compared for start, _ in pieces)  # and a piece continuing a prefix


def test_no_mixed_graph_has_more_prompt_tokens_than_keys():
    """Such a graph could never be used, and capturing one (8,192 tokens over 4,096 keys,
    the burst of --max-prefill-tokens 2048) faulted on an H200 and killed the worker."""
    from batchd.workers.hf.graphs import MIXED_KEYS, mixed_graph_shapes, mixed_graph_sizes

    shapes = mixed_graph_shapes(mixed_graph_sizes(2048, 8192))
    assert (8192, max(MIXED_KEYS)) in shapes and (512, min(MIXED_KEYS)) in shapes
    assert (2048, min(keys for keys in MIXED_KEYS if keys >= 2048)) in shapes
    assert all(keys >= tokens for tokens, keys in shapes)
    assert shapes == sorted(shapes, reverse=True)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_a_decode_step_through_a_smaller_graphs_row_layout_matches_the_eager_step(tiny_models):
    """A smaller decode graph's step (its own block mask of its row count, the rows' tables
    and lengths gathered from their slots, idle rows attending to nothing) computes what the
    eager step over the slots computes. On the CPU the buffers run uncaptured."""
    engine = build_engine(str(tiny_models["llama"]), slots=8, max_context=128, max_prefill_tokens=64,
                          attention="flex", block_size=16, overlap=False, device="cpu")
    runner = engine._runner
    forward = runner.forward
    compared = []

    def both(chunks, previous=None):
        logits, rows = forward(chunks, previous)
        if all(len(c.token_ids) == 1 for c in chunks) and len(chunks) <= 4:
            graph = DecodeGraph(rows=4, slots=runner.slots, device=runner.device)
            assert graph.batch.row_layout
            wanted = [c for c in chunks if c.logit_rows()]
            with torch.inference_mode():
                logit_rows = graph.fill(runner, chunks, wanted, previous)
                small = graph.run(runner)[logit_rows].float()
            eager = {id(chunk): row for chunk, row in zip(rows, logits)}
            for chunk, row in zip(wanted, small):
                assert torch.allclose(row, eager[id(chunk)], atol=1e-4), chunk
            compared.append(sorted(c.slot for c in chunks))
        return logits, rows

    runner.forward = both
    rng = random.Random(17)
    # Requests ending at different steps leave 3, 2 and 1 decoding, in slots that are not the first.
    arrivals = {0: [request(f"r{i}", random_prompt(rng, 10 + 7 * i), max_new_tokens=4 + 3 * i) for i in range(6)]}
    drive(engine, arrivals)
    assert any(len(slots) == 1 for slots in compared) and any(len(slots) >= 3 for slots in compared)
    assert any(slots[0] > 0 for slots in compared)  # rows whose slots are not rows 0..n


@needs_cuda
def test_varlen_prompt_attention_reads_grouped_keys_without_repeating_them(caplog):
    """torch 2.11's varlen flash attention has no enable_gqa, but FlashAttention maps query
    heads to key heads itself: the keys go in with their own 8 heads (no copy per query head),
    and the answer is the per-piece causal attention's."""
    import logging

    from batchd.workers.hf.attention import varlen_attention
    from test_greedy_matches_hf import _varlen_reference

    device = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="batchd"):
        prefill = varlen_attention(8, 16, 128 ** -0.5, device)
    assert prefill is not None and "keys grouped" in caplog.text, caplog.text
    generator = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(300, 16, 128, device=device, dtype=torch.bfloat16, generator=generator)
    k = torch.randn(700, 8, 128, device=device, dtype=torch.bfloat16, generator=generator)
    v = torch.randn(700, 8, 128, device=device, dtype=torch.bfloat16, generator=generator)
    cu_q = torch.tensor([0, 100, 300], dtype=torch.int32, device=device)  # a fresh prompt, then one continuing 500 keys
    cu_k = torch.tensor([0, 100, 700], dtype=torch.int32, device=device)
    out = prefill._varlen(q, k, v, cu_q, cu_k, 200, 600)
    reference = _varlen_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), cu_q.cpu(), cu_k.cpu(),
                                  200, 600, 128 ** -0.5)
    assert (out.float().cpu() - reference).abs().max() < 2e-2
