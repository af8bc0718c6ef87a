"""BENCHMARKS.md sections 1-5 on one GPU: the workloads a serving fleet sends, through the engine's
public contract only (add, add_score, step, has_work, stats, reset_prefix_cache).

Phases (in --phases order; each writes its result to the JSON as soon as it exists):
- check:     on this GPU, the paged attention paths against the exact one (bf16), and a tiny
             float32 model through graphs, shared prefixes and preemption against generate
- micro:     one decode step's attention over the pool against the copy bandwidth
- mixed:     a step that carries a prompt piece against a decode-only step, 256 live requests
- anchor:    256 requests at once (prompt, output U[100, 1024]); HBM roofline
- sustained: 1,024 such requests through 256 slots; roofline with FIFO admission
- sustained_sampled: the same, every request sampled at temperature 0.8 with no seed (not in
  the default phases)
- poisson:   arrivals at --rates requests/s; TTFT and ITL p50/p99 and delivered tok/s per rate
- smc_gc:    the smc phase (256 particles, top_k=20) with the start-up heap left to the cyclic
             collector and frozen out of it as a worker does, and a host profile of it
- smc:       K particles share a 256-token prompt; each step every particle asks
             next_token_logprobs(top_k=20) of its prefix and appends one token; against HF
             in process decoding all particles in lockstep with a DynamicCache
- long_context: 40 GiB of KV, max_context 32,768, prompts U[100, 6000], outputs U[100, 1024]:
             requests live at once and tok/s, and the same engine capped at the 45 slots a
             per-slot cache of 8,192 tokens held in that memory
- system_prompt: a 1,000-token system prompt before 256 short questions: prompt tokens
             computed against 1,000 plus the questions' own
- kv_capacity: 128 requests of the long-context distribution through 8 GiB of KV, bf16 against
             --kv-dtype fp8: requests live at once (the bar: fp8 holds >= 1.8x) and tok/s

--kv-dtype fp8 runs the other phases over a float8 pool.

    python benchmarks/serving_gpu.py --out $OUT/serving.json
    python benchmarks/serving_gpu.py --small --device cpu      # a shape check of the script itself
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf import HFEngine
from batchd.workers.hf.kv_cache import kv_bytes_per_token
from batchd.workers.hf.models import LoadedModel
from batchd.workers.engine import ScoreItem
from engine_gpu import (Report, _free_engine_memory, _sync, build_model, copy_bandwidth, engine_latency, hf_generate,
                        qwen3_config, roofline, word_tokenizer, workload)

log = logging.getLogger("serving_gpu")


def make_engine(model, device: str, **options) -> HFEngine:
    loaded = LoadedModel(model=model, tokenizer=word_tokenizer(model.config.vocab_size),
                         name=f"{model.config.model_type}-random")
    options.setdefault("attention", "flex" if device != "cpu" else "sdpa")
    return HFEngine(loaded, **options)


def _add(engine: HFEngine, label: str, requests, start: int = 0, temperature: float = 0.0) -> None:
    """Greedy requests (BENCHMARKS.md's); temperature > 0: sampled, with no seed, as most chat
    requests come."""
    for index, (prompt, output) in enumerate(requests, start):
        params = SamplingParams(max_new_tokens=output, ignore_eos=True, temperature=temperature)
        engine.add(EngineRequest(f"{label}{index}", prompt, params))


def _drain(engine: HFEngine, label: str, device: str, on_step=None) -> dict:
    tokens, steps, live = 0, 0, []
    _sync(device)
    started = time.perf_counter()
    while engine.has_work():
        emitted = sum(len(o.new_token_ids) for o in engine.step())
        tokens += emitted
        steps += 1
        live.append(engine.num_running)
        if on_step is not None:
            on_step(engine, emitted)
        if steps % 500 == 0:
            log.info("  %s: %d steps, %d tokens, %.1fs", label, steps, tokens, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return {"output_tokens": tokens, "seconds": round(seconds, 2), "steps": steps, "tok_s": round(tokens / seconds, 1),
            "most_live": max(live) if live else 0}


# -- rooflines -----------------------------------------------------------------------------

def roofline_fifo(requests, cap: int, model, bandwidth: float) -> dict:
    """Best possible decode rate when at most `cap` run at once: admitted in order as others
    end, each step every live request emits one token and reads its KV; prefill free."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    pending = list(requests)
    live = []  # [prompt length, tokens emitted, output length]
    seconds, tokens = 0.0, 0
    while pending or live:
        while pending and len(live) < cap:
            prompt, output = pending.pop(0)
            live.append([len(prompt), 0, output])
        seconds += (weight_bytes + sum(p + e for p, e, _ in live) * per_token) / bandwidth
        tokens += len(live)
        for entry in live:
            entry[1] += 1
        live = [entry for entry in live if entry[1] < entry[2]]
    return {"cap": cap, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "output_tokens": tokens,
            "tok_s": round(tokens / seconds, 1)}


# -- phases ----------------------------------------------------------------------------------

def check_paths(model, device: str, requests) -> dict:
    """The GPU's attention paths against the exact one (gather + SDPA), bf16, on the same
    steps of two fresh engines: prompts continuing a cached prefix (varlen over gathered
    keys) and decode rows (flex over the block tables)."""
    from batchd.workers.hf.attention import PagedSdpa

    prompts = [p[:200 + 30 * i] for i, (p, _) in enumerate(requests[:8])]
    extended = [prompt + requests[20][0][:40] for prompt in prompts]

    def logits_with(exact: bool):
        engine = make_engine(model, device, slots=16, kv_memory=2**30, max_context=4096, cuda_graph=False,
                             compile_decode=False, max_prefill_tokens=4096, overlap=False)
        runner = engine._runner
        paths = (type(runner.prefill_attention).__name__, type(runner.decode_attention).__name__)
        if exact:
            runner.prefill_attention = runner.decode_attention = PagedSdpa(
                runner._heads, runner._kv_heads, runner._head_dim, runner._scale)
        _add(engine, "p", [(prompt, 1) for prompt in prompts])  # cached; then continued by 40 tokens
        while engine.has_work():
            engine.step()
        rows, forward = [], runner.forward
        runner.forward = lambda chunks, previous=None: _keep(rows, forward(chunks, previous))
        _add(engine, "e", [(prompt, 4) for prompt in extended])
        while engine.has_work():
            engine.step()
        hits = engine.stats()["prefix_cache_hits"]
        del engine, runner
        _free_engine_memory(device)
        return rows, paths, hits

    results_kernel = varlen_alignment(model, device) if device != "cpu" else {}
    paged, paths, hits = logits_with(exact=False)
    reference, _, _ = logits_with(exact=True)
    results = {"prefill_path": paths[0], "decode_path": paths[1], "steps": len(paged),
               "rows": sum(a.shape[0] for a in paged), "prefix_cache_hits": hits,
               "max_abs_diff": round(max((a - b).abs().max().item() for a, b in zip(paged, reference)), 4),
               "largest_logit": round(max(b.abs().max().item() for b in reference), 2),
               "same_argmax_rows": sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(paged, reference))}
    results["varlen_kernel"] = results_kernel
    results["exactness_fp32"] = exactness_fp32(device)
    return results


def varlen_alignment(model, device: str) -> dict:
    """The varlen kernel alone on pieces whose keys are longer than their queries (a prompt
    continuing a cached prefix): against SDPA with the causal mask aligned to the end."""
    import torch.nn.functional as F

    from batchd.workers.hf.attention import varlen_attention

    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    varlen = varlen_attention(kv_heads, heads, dim ** -0.5, torch.device(device))  # as the runner builds it
    if varlen is None:
        return {"skipped": "no varlen attention"}
    pieces = [(40, 300), (128, 128), (7, 1000)]  # (queries, keys)
    q = torch.randn(sum(n for n, _ in pieces), heads, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(sum(m for _, m in pieces), kv_heads, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu_q = torch.tensor([0, 40, 168, 175], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 300, 428, 1428], device=device, dtype=torch.int32)
    out = varlen._varlen(q, k, v, cu_q, cu_k, 128, 1000)
    errors = []
    for i, (n, m) in enumerate(pieces):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None].float()
        ks, vs = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None].float() for t in (k, v))
        mask = torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)
        ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=dim ** -0.5, enable_gqa=True)
        errors.append(round((out[cu_q[i]:cu_q[i + 1]].float() - ref[0].transpose(0, 1)).abs().max().item(), 4))
    return {"pieces_queries_keys": pieces, "max_abs_error_each": errors}


def _keep(rows, result):
    rows.append(result[0].detach().clone())
    return result


def exactness_fp32(device: str, count: int = 24) -> dict:
    """A tiny float32 Qwen3 through flex, CUDA graphs, shared prefixes and a pool small enough
    to preempt: greedy must equal generate on the same GPU."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(1)
    with torch.device(device):
        tiny = AutoModelForCausalLM.from_config(qwen3_config(small=True), dtype=torch.float32).eval()
    tiny.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    per_block = 128 * kv_bytes_per_token(tiny.config, torch.float32)
    engine = make_engine(tiny, device, slots=16, max_context=512, kv_memory=9 * per_block, cuda_graph_sizes=(8, 16),
                         max_prefill_tokens=256)
    rng = random.Random(3)
    shared = [rng.randrange(tiny.config.vocab_size) for _ in range(150)]
    requests = [((shared if i % 2 else []) + [rng.randrange(tiny.config.vocab_size) for _ in range(rng.randint(5, 90))],
                 rng.randint(20, 120)) for i in range(count)]
    outputs = {f"x{i}": [] for i in range(count)}
    _add(engine, "x", requests)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    identical = sum(outputs[f"x{i}"] == hf_generate(tiny, [p], n)[0] for i, (p, n) in enumerate(requests))
    return {"requests": count, "token_identical": identical, **engine.stats(),
            "cuda_graph_sizes": engine.cuda_graph_sizes}


def micro_decode_attention(engine: HFEngine, requests, device: str, bandwidth: float) -> dict:
    """One decode step's attention for 256 live requests, through the block tables, against
    the bytes it must read at the copy bandwidth."""
    runner = engine._runner
    _add(engine, "m", [(p, 64) for p, _ in requests])
    while engine.num_waiting or engine.num_prefilling:
        engine.step()
    batch = None
    captured = {}
    forward_batch = runner.forward_batch

    def grab(step_batch):
        captured["batch"] = step_batch
        return forward_batch(step_batch)

    runner.forward_batch = grab
    runner.graphs, graphs = None, runner.graphs  # one eager decode step, to see its batch
    engine.step()
    runner.graphs, runner.forward_batch = graphs, forward_batch
    batch = captured["batch"]
    q = torch.randn(batch.num_decodes, runner._heads, runner._head_dim, device=device, dtype=runner.dtype)
    attention = runner.decode_attention
    attention.prepare(batch)
    lengths = batch.slot_lengths
    for _ in range(3):
        attention.decode(q, runner.pool, 0, batch)
    _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        attention.decode(q, runner.pool, 0, batch)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / 20
    tokens = int(lengths.sum())
    read = tokens * runner._kv_heads * runner._head_dim * 2 * runner.pool.keys.element_size()
    for index in range(len(requests)):
        engine.cancel(f"m{index}")
    while engine.has_work():
        engine.step()
    return {"rows": batch.num_decodes, "live_tokens": tokens, "ms_per_layer": round(ms, 4),
            "read_gb_s": round(read / ms / 1e6, 1), "of_copy_bandwidth": round(read / ms / 1e6 / (bandwidth / 1e9), 3)}


def mixed_steps(engine: HFEngine, requests, device: str, pieces=(128, 512, 1000, 2000)) -> dict:
    """With 256 requests decoding, the wall time of a step that also carries a P-token prompt
    piece against a decode-only step, and how much of it the host spends queuing the step."""
    runner = engine._runner
    forward = runner.forward
    host = []

    def timed(chunks, previous=None):
        started = time.perf_counter()
        try:
            return forward(chunks, previous)
        finally:
            host.append(time.perf_counter() - started)

    _add(engine, "mx", [(p[:600], 2000) for p, _ in requests[:-1]])  # a row left for the prompt
    while engine.num_waiting or engine.num_prefilling:
        engine.step()
    table = []
    runner.forward = timed
    try:
        for piece in (0, *pieces):
            walls = []
            host.clear()
            for repeat in range(6):
                for _ in range(3):  # decode steps only, then time the step that takes the prompt in
                    engine.step()
                _sync(device)
                host.clear()
                started = time.perf_counter()
                if piece:
                    prompt = (requests[repeat][0] + requests[repeat + 6][0])[:piece]  # a workload prompt is <= 1,024
                    engine.add(EngineRequest(f"piece{piece}_{repeat}", prompt,
                                             SamplingParams(max_new_tokens=1, ignore_eos=True)))
                engine.step()
                _sync(device)
                walls.append(time.perf_counter() - started)
            table.append({"prompt_tokens": piece, "step_ms": round(float(np.median(walls)) * 1e3, 2),
                          "host_queue_ms": round(float(np.median(host)) * 1e3, 2) if host else None})
            log.info("  %s", table[-1])
    finally:
        runner.forward = forward
    for index in range(len(requests) - 1):
        engine.cancel(f"mx{index}")
    while engine.has_work():
        engine.step()
    return {"live": len(requests) - 1, "budget": engine.max_prefill_tokens, "burst": engine.burst_prefill_tokens,
            "table": table, "note": "the timed step admits a new prompt and carries its first min(P, step budget) "
                                    "tokens (the backlog is that prompt alone: the base budget up to 4x it)"}


def anchor(engine: HFEngine, requests, device: str) -> dict:
    engine.reset_prefix_cache()
    _add(engine, "a", requests)
    return {"requests": len(requests), **_drain(engine, "anchor", device)}


def sustained(engine: HFEngine, requests, device: str, slots: int, profile_steps: int = 0,
              temperature: float = 0.0) -> dict:
    """More requests than run at once: all queued at the start, admitted as others finish.
    Where the time goes: each step call is timed and sorted by the prompt tokens it planned;
    with profile_steps, the GPU's kernels over that many steady-state steps (from step 600,
    where every row is busy and most steps carry a prompt piece), summed by kind."""
    engine.reset_prefix_cache()
    _add(engine, "s", requests, temperature=temperature)
    start = 600 if len(requests) > 200 else 20  # 20: the script check's small run
    steps = StepLog(engine, profile_from=start if profile_steps else None, profile_steps=profile_steps)
    result = {"requests": len(requests), "slots": slots, "temperature": temperature, **_drain(engine, "sustained", device, on_step=steps.record)}
    return {**result, "steps_by_prompt_tokens": steps.summary(), **steps.profiled()}


class StepLog:
    """Each step call's wall time, prompt tokens planned, tokens emitted, rows running and host
    wait for the GPU, summed by how many prompt tokens the step carried: what a step that
    carries prompt pieces costs against a pure decode step, over a whole run."""

    BUCKETS = ((0, 0), (1, 128), (129, 512), (513, 2048), (2049, 1 << 30))

    def __init__(self, engine: HFEngine, profile_from: int | None = None, profile_steps: int = 0):
        self._engine = engine
        self._profile_from, self._profile_steps = profile_from, profile_steps
        self._profiler, self._profile = None, {}
        self._last = time.perf_counter()
        self._prompt = engine.stats()["prompt_tokens_computed"]
        self._waited = engine.device_wait_s
        self.rows: list[tuple[float, int, int, float, int]] = []  # (wall s, prompt tokens, running, waited s, emitted)

    def record(self, engine: HFEngine, emitted: int) -> None:
        now, prompt = time.perf_counter(), engine.stats()["prompt_tokens_computed"]
        self.rows.append((now - self._last, prompt - self._prompt, engine.num_running,
                          engine.device_wait_s - self._waited, emitted))
        if self._profile_from is not None:
            self._profile_window(len(self.rows))
        self._last, self._prompt, self._waited = time.perf_counter(), prompt, engine.device_wait_s

    def _profile_window(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        on_gpu = torch.cuda.is_available()
        if step == self._profile_from:
            self._profiler = profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU])
            self._profiler.__enter__()
        elif step == self._profile_from + self._profile_steps and self._profiler is not None:
            if on_gpu:
                torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            from step_kernels import kernel_totals, kind_of  # imports this module: imported late

            count = self._profile_steps
            kernels = {name: us for name, (us, _calls) in kernel_totals(self._profiler, on_gpu).items()}
            by_kind = {}
            for name, us in kernels.items():
                by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
            window = self.rows[self._profile_from:self._profile_from + count]
            self._profile = {"profiled_steps": {
                "from_step": self._profile_from, "steps": count,
                "wall_ms_per_step": round(sum(r[0] for r in window) / len(window) * 1e3, 3),
                "host_waits_ms_per_step": round(sum(r[3] for r in window) / len(window) * 1e3, 3),
                "mean_prompt_tokens": round(sum(r[1] for r in window) / len(window), 1),
                "mean_running": round(sum(r[2] for r in window) / len(window), 1),
                "gpu_busy_ms_per_step": round(sum(by_kind.values()) / count / 1e3, 3),
                "by_kind_ms_per_step": {k: round(v / count / 1e3, 3) for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
                "top_kernels_us_per_step": {k[:100]: round(v / count, 1)
                                            for k, v in sorted(kernels.items(), key=lambda i: -i[1])[:15]}}}
            log.info("sustained, profiled steps: %s", self._profile["profiled_steps"])
            self._profiler = None

    def profiled(self) -> dict:
        return self._profile

    def summary(self) -> list[dict]:
        out = []
        for low, high in self.BUCKETS:
            rows = [r for r in self.rows if low <= r[1] <= high]
            if not rows:
                continue
            wall = sum(r[0] for r in rows)
            out.append({"prompt_tokens": f"{low}-{high}" if high < 1 << 30 else f">={low}", "steps": len(rows),
                        "seconds": round(wall, 3), "ms_per_step": round(wall / len(rows) * 1e3, 3),
                        "mean_prompt_tokens": round(sum(r[1] for r in rows) / len(rows), 1),
                        "mean_running": round(sum(r[2] for r in rows) / len(rows), 1),
                        "mean_emitted": round(sum(r[4] for r in rows) / len(rows), 1),
                        "host_waits_ms_per_step": round(sum(r[3] for r in rows) / len(rows) * 1e3, 3)})
        log.info("steps by prompt tokens: %s", out)
        return out


def poisson(engine: HFEngine, requests, rate: float, device: str) -> dict:
    """TTFT and ITL at one arrival rate (engine_gpu.py's measurement), and the preemptions."""
    return {**engine_latency(engine, requests, rate, device, seed=int(rate)),
            "preemptions": engine.stats()["num_preemptions"]}


def smc_engine(engine: HFEngine, prompt: list[int], particles: int, steps: int, top_k: int | None, device: str) -> dict:
    """Every step, each particle's next-token distribution of its prefix, then one token each."""
    engine.reset_prefix_cache()
    rng = random.Random(0)
    prefixes = [list(prompt) for _ in range(particles)]
    before = engine.stats()
    _sync(device)
    started, in_engine = time.perf_counter(), 0.0
    for step in range(steps):
        calls = time.perf_counter()
        for index, prefix in enumerate(prefixes):
            engine.add_score(EngineRequest(f"k{step}_{index}", prefix, SamplingParams()), ScoreItem(prefix, None, top_k))
        answers = {}
        while engine.has_work():
            for out in engine.step():
                answers[out.request_id] = out.score
        in_engine += time.perf_counter() - calls
        for index, prefix in enumerate(prefixes):
            score = answers[f"k{step}_{index}"]
            if top_k is None:
                prefix.append(int(torch.multinomial(score.next_token_logprobs.float().exp(), 1)))
            else:
                weights = np.exp(np.array(score.top_logprobs) - max(score.top_logprobs))
                prefix.append(rng.choices(score.top_token_ids, weights)[0])
    seconds = time.perf_counter() - started
    after = engine.stats()
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    # calls_s: the calls' own time (submitting and answering them); the caller's sampling from
    # each answer (a 152k-entry vector on the CPU, for full vectors) is its own cost.
    return {"particles": particles, "steps": steps, "top_k": top_k, "calls": particles * steps,
            "seconds_in_calls": round(in_engine, 2), "calls_s": round(particles * steps / in_engine, 1),
            "calls_s_with_caller_sampling": round(particles * steps / seconds, 1), "prompt_tokens_computed": computed}


def smc_gc(engine: HFEngine, prompt: list[int], particles: int, steps: int, device: str, out_dir: str) -> dict:
    """The smc phase with the start-up heap left to the cyclic collector and frozen out of it
    (as a worker does before its loop), then the frozen run's host time by function (cProfile,
    which slows the calls down: its calls/s are not the engine's)."""
    import cProfile
    import gc
    import io
    import pstats

    results = {"plain": smc_engine(engine, prompt, particles, steps, 20, device)}
    gc.collect()
    gc.freeze()
    try:
        results["frozen"] = smc_engine(engine, prompt, particles, steps, 20, device)
        profile = cProfile.Profile()
        profile.enable()
        results["frozen_profiled"] = smc_engine(engine, prompt, particles, steps, 20, device)
        profile.disable()
    finally:
        gc.unfreeze()  # the next engine's memory needs this one's cycles collected
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    Path(out_dir, "smc_profile.txt").write_text(text.getvalue())
    return results


def smc_hf_lockstep(model, prompt: list[int], particles: int, steps: int, device: str) -> dict:
    """The best one process does without batchd: all particles in one batch, a DynamicCache,
    one forward of the new tokens per step, top-20 reduced on the GPU and read back."""
    from transformers import DynamicCache

    rng = random.Random(0)
    ids = torch.tensor([prompt] * particles, device=device)
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for step in range(steps):
            top = torch.topk(torch.log_softmax(out.logits[:, -1].float(), -1), 20)
            values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
            chosen = [rng.choices(i, np.exp(np.array(v) - max(v)))[0] for v, i in zip(values, indices)]
            if step + 1 < steps:
                out = model(input_ids=torch.tensor(chosen, device=device)[:, None], past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - started
    return {"particles": particles, "steps": steps, "calls": particles * steps, "seconds": round(seconds, 2),
            "calls_s": round(particles * steps / seconds, 1)}


def long_context(model, device: str, args, small: bool) -> dict:
    count = 16 if small else 128
    low, high = (10, 100) if small else (100, 6000)
    np.random.seed(5)
    prompts = np.random.randint(low, high + 1, count)
    outputs = np.random.randint(10 if small else 100, (40 if small else 1024) + 1, count)
    requests = [(np.random.randint(0, model.config.vocab_size, n).tolist(), int(m)) for n, m in zip(prompts, outputs)]
    memory = (2**26 if small else 40 * 2**30)
    results = {"requests": count, "kv_memory_gib": memory / 2**30}
    for label, slots, context in (("paged_32768", count, 32_768), ("per_slot_emulation_45x8192", 45, 8192)):
        engine = make_engine(model, device, slots=min(slots, count), kv_memory=memory, max_context=context,
                             max_prefill_tokens=args.max_prefill_tokens, burst_prefill_tokens=args.burst_prefill_tokens)
        _add(engine, "w", requests[:4])  # warm-up
        _drain(engine, "warm", device)
        engine.reset_prefix_cache()
        _add(engine, "l", requests)
        results[label] = {"slots": min(slots, count), "max_context": context, "pool_tokens": engine.kv_cache_tokens,
                          **_drain(engine, label, device), "preemptions": engine.stats()["num_preemptions"]}
        log.info("  %s", results[label])
        del engine
        _free_engine_memory(device)
    return results


def kv_capacity(model, device: str, args, small: bool) -> dict:
    """The same memory, the same requests: how many run at once with bf16 keys and values, and with float8."""
    count = 16 if small else args.capacity_requests
    np.random.seed(6)
    prompts = np.random.randint(10 if small else 100, (100 if small else 6000) + 1, count)
    outputs = np.random.randint(10 if small else 100, (40 if small else 1024) + 1, count)
    requests = [(np.random.randint(0, model.config.vocab_size, n).tolist(), int(m)) for n, m in zip(prompts, outputs)]
    memory = 2**24 if small else 8 * 2**30
    results = {"requests": count, "kv_memory_gib": memory / 2**30}
    for kv_dtype in ("auto", "fp8"):
        engine = make_engine(model, device, slots=count, kv_memory=memory, max_context=8192 if not small else 512,
                             max_prefill_tokens=args.max_prefill_tokens, burst_prefill_tokens=args.burst_prefill_tokens,
                             kv_dtype=kv_dtype)
        _add(engine, "w", requests[:4])
        _drain(engine, "warm", device)
        engine.reset_prefix_cache()
        _add(engine, "c", requests)
        results[engine.kv_dtype] = {"pool_tokens": engine.kv_cache_tokens, **_drain(engine, "c", device),
                                    "preemptions": engine.stats()["num_preemptions"]}
        log.info("  %s", results[engine.kv_dtype])
        del engine
        _free_engine_memory(device)
    live = [results[k]["most_live"] for k in results if isinstance(results[k], dict)]
    results["live_ratio"] = round(live[1] / live[0], 2)
    return results


def system_prompt(engine: HFEngine, vocab: int, device: str, questions: int = 256) -> dict:
    engine.reset_prefix_cache()
    rng = random.Random(9)
    system = [rng.randrange(vocab) for _ in range(1000)]
    asks = [[rng.randrange(vocab) for _ in range(rng.randint(10, 40))] for _ in range(questions)]
    before = engine.stats()
    for index, question in enumerate(asks):
        engine.add(EngineRequest(f"q{index}", system + question, SamplingParams(max_new_tokens=16, ignore_eos=True)))
    drained = _drain(engine, "system_prompt", device)
    computed = engine.stats()["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    floor = len(system) + sum(map(len, asks))
    return {"questions": questions, "prompt_tokens_computed": computed, "system_plus_questions": floor,
            "ratio": round(computed / floor, 3), **drained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--shape", choices=("qwen3-0.6b", "llama3-8b"), default="qwen3-0.6b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="the step's prompt budget (default: the engine's)")
    parser.add_argument("--burst-prefill-tokens", type=int, default=None,
                        help="the budget while a backlog waits (default: the engine's)")
    parser.add_argument("--rates", default="10,20,30,40")
    parser.add_argument("--poisson-requests", type=int, default=300)
    parser.add_argument("--particles", default="256,64")
    parser.add_argument("--smc-steps", type=int, default=30)
    parser.add_argument("--phases", default="check,anchor,sustained,poisson,smc,system_prompt,micro,mixed,long_context")
    parser.add_argument("--kv-dtype", default="auto", choices=("auto", "fp8"))
    parser.add_argument("--capacity-requests", type=int, default=128, help="kv_capacity: requests sent at once")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="sustained: profile the GPU's kernels over this many steady-state steps (from step 600); "
                             "the profiler slows those steps, so report tok/s from a run without it")
    parser.add_argument("--out", default="benchmarks/results/serving_gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device, small = args.device, args.small
    phases = args.phases.split(",")
    model = build_model(small, device, args.shape)
    low, high = (10, 40) if small else (100, 1024)
    vocab = model.config.vocab_size
    requests = workload(16 if small else 256, low, high, vocab)
    more = workload(64 if small else 1024, low, high, vocab, seed=1)
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "model": f"{args.shape} shape, random weights" if not small else "tiny Qwen3 (script check)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = Report(args.out, meta)
    report.data["benchmark"] = "serving_gpu"
    bandwidth = copy_bandwidth(device, 0.25 if small else 2.0) if device != "cpu" else 20e9
    report.data["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    if "check" in phases and device != "cpu":
        report.phase("check", lambda: check_paths(model, device, requests))
    slots = min(args.slots, len(requests))
    needs_engine = {"anchor", "sustained", "sustained_sampled", "poisson", "smc", "system_prompt", "micro", "mixed"} & set(phases)
    if needs_engine:
        started = time.perf_counter()
        engine = make_engine(model, device, slots=slots, max_context=4096, max_prefill_tokens=args.max_prefill_tokens,
                             burst_prefill_tokens=args.burst_prefill_tokens, kv_dtype=args.kv_dtype)
        report.data["engine_start_s"] = round(time.perf_counter() - started, 1)
        report.data["engine"] = {"pool_tokens": engine.kv_cache_tokens, "kv_dtype": engine.kv_dtype, "max_prefill_tokens": engine.max_prefill_tokens,
                                 "burst_prefill_tokens": engine.burst_prefill_tokens,
                                 "graphs": engine.cuda_graph_sizes}
        _add(engine, "warm", requests[:4])
        _drain(engine, "warm", device)
        work = {
            "anchor": lambda: {**anchor(engine, requests, device),
                               "roofline": roofline(requests, model, bandwidth)},
            "sustained": lambda: {**sustained(engine, more, device, slots, args.profile_steps),
                                  "roofline": roofline_fifo(more, slots, model, bandwidth)},
            # The same, every request sampled (temperature 0.8, no seed), as chat requests come.
            "sustained_sampled": lambda: {**sustained(engine, more, device, slots, temperature=0.8),
                                          "roofline": roofline_fifo(more, slots, model, bandwidth)},
            "poisson": lambda: {"rates": [poisson(engine, workload(args.poisson_requests, low, high, vocab, seed=7),
                                                  float(rate), device) for rate in args.rates.split(",")]},
            "smc_gc": lambda: smc_gc(engine, requests[0][0][:256], 256, args.smc_steps, device,
                                               str(Path(args.out).parent)),
            "smc": lambda: {"runs": [smc_engine(engine, requests[0][0][:256], int(k), args.smc_steps, top_k, device)
                                     for k in args.particles.split(",") for top_k in (20, None)]},
            "system_prompt": lambda: system_prompt(engine, vocab, device, questions=32 if small else 256),
            "micro": lambda: micro_decode_attention(engine, requests, device, bandwidth),
            "mixed": lambda: mixed_steps(engine, requests, device),
        }
        for name in phases:
            if name in work and (name != "micro" or device != "cpu"):
                report.phase(name, work[name])
        del engine, work
        _free_engine_memory(device)
    if "smc" in phases:
        report.phase("smc_hf_lockstep", lambda: {"runs": [smc_hf_lockstep(model, requests[0][0][:256], int(k),
                                                                          args.smc_steps, device)
                                                          for k in args.particles.split(",")]})
    if "long_context" in phases:
        report.phase("long_context", lambda: long_context(model, device, args, small))
    if "kv_capacity" in phases:
        report.phase("kv_capacity", lambda: kv_capacity(model, device, args, small))
    print_table(report.data)


def print_table(data: dict) -> None:
    phases = data["phases"]
    print(f"\n{data['device']}, {data['model']}, copy bandwidth {data['copy_bandwidth_gb_s']} GB/s")
    for name in ("anchor", "sustained", "sustained_sampled"):
        result = phases.get(name, {})
        if "tok_s" in result:
            roof = result["roofline"]["tok_s"]
            print(f"{name:<17} {result['tok_s']:>10} tok/s = {result['tok_s'] / roof:.0%} of its roofline {roof}")
        for bucket in result.get("steps_by_prompt_tokens", []):
            print(f"  steps with {bucket['prompt_tokens']:>9} prompt tokens: {bucket['steps']:>5} steps, "
                  f"{bucket['seconds']:>7} s, {bucket['ms_per_step']} ms each, {bucket['mean_running']} running, "
                  f"{bucket['mean_emitted']} emitted, "
                  f"host waits {bucket['host_waits_ms_per_step']} ms")
    for rate in phases.get("poisson", {}).get("rates", []):
        print(f"poisson {rate['rate_per_s']:>5}/s  TTFT p50/p99 {rate['ttft_ms_p50']}/{rate['ttft_ms_p99']} ms  "
              f"ITL p50/p99 {rate['itl_ms_p50']}/{rate['itl_ms_p99']} ms  {rate['tok_s']} tok/s")
    hf = {r["particles"]: r["calls_s"] for r in phases.get("smc_hf_lockstep", {}).get("runs", [])}
    for run in phases.get("smc", {}).get("runs", []):
        peer = hf.get(run["particles"])
        ratio = f" = {run['calls_s'] / peer:.1f}x HF lockstep {peer}" if peer and run["top_k"] else ""
        print(f"smc {run['particles']} particles top_k={run['top_k']}: {run['calls_s']} calls/s{ratio}")
    prompt = phases.get("system_prompt", {})
    if "ratio" in prompt:
        print(f"system prompt: {prompt['prompt_tokens_computed']} prompt tokens computed for "
              f"{prompt['system_plus_questions']} ({prompt['ratio']}x)")
    long = phases.get("long_context", {})
    for label in ("paged_32768", "per_slot_emulation_45x8192"):
        if label in long:
            print(f"long context {label}: {long[label]['most_live']} live at most, {long[label]['tok_s']} tok/s")


if __name__ == "__main__":
    main()
