"""BENCHMARKS.md section 1: the anchor workload on one GPU, batchd's engine against its peers.

Qwen3-0.6B shape with random bf16 weights; 256 requests of random prompt token
ids, prompt and output lengths uniform in [100, 1024] (numpy seed 0), EOS
ignored, greedy. Measured in one process, one after another:

- the HBM roofline for this exact work at a measured device-to-device copy bandwidth
- batchd's hf engine (flex attention over live blocks, CUDA graph for decode steps),
  with one step in flight (the default) and in lockstep (each step's tokens read
  before the next is queued), and how many host syncs a step makes
- HF `generate` one request at a time (a subset, capped outputs; an estimate)
- HF `generate` with static padded batches of 16 (per-step time from one batch; an estimate)
- transformers' continuous batching, tuned as BENCHMARKS.md says (a subset of requests)
- TTFT and inter-token latency of the engine at a moderate Poisson arrival rate

Each phase's result is written to the JSON as soon as it exists, so a phase
that fails or a run cut short still leaves the others.

    python benchmarks/engine_gpu.py --out $OUT/engine_gpu.json
    python benchmarks/engine_gpu.py --small --device cpu   # a shape check of the script itself
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf import HFEngine
from batchd.workers.hf.kv_cache import kv_bytes_per_token
from batchd.workers.hf.models import LoadedModel

log = logging.getLogger("engine_gpu")


# -- the workload -------------------------------------------------------------------------

def qwen3_config(small: bool):
    from transformers import Qwen3Config

    if small:
        return Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           max_position_embeddings=4096, tie_word_embeddings=True)
    return Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40_960, tie_word_embeddings=True, rope_theta=1_000_000)


def workload(count: int, low: int, high: int, vocab: int, seed: int = 0):
    """[(prompt token ids, output length)]: lengths uniform in [low, high]."""
    np.random.seed(seed)
    prompt_lens = np.random.randint(low, high + 1, count)
    output_lens = np.random.randint(low, high + 1, count)
    return [(np.random.randint(0, vocab, n).tolist(), int(m)) for n, m in zip(prompt_lens, output_lens)]


def llama3_8b_config():
    """Llama-3-8B's shape: where the dense products of 256 rows are no longer free."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500_000, tie_word_embeddings=False)


def build_model(small: bool, device: str, shape: str = "qwen3-0.6b"):
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    config = llama3_8b_config() if shape == "llama3-8b" and not small else qwen3_config(small)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # No EOS: every request runs to its output length, as the workload says.
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    return model


def word_tokenizer(vocab: int):
    """A tokenizer with one word per id: random ids have no real text, but the engine still
    detokenizes every token, as it would when serving."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0")


# -- roofline -----------------------------------------------------------------------------

def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes per second of a large device-to-device copy (read plus write)."""
    count = int(gib * 2**30) // 2
    source = torch.randn(count, device=device, dtype=torch.float32).to(torch.bfloat16)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(10):
        started = _now(device)
        target.copy_(source)
        times.append(_now(device) - started)
    return 2 * source.numel() * source.element_size() / float(np.median(times))


def roofline(requests, model, bandwidth: float) -> dict:
    """Best possible decode rate: each step reads the weights once plus every live request's KV."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    prompt = np.array([len(p) for p, _ in requests])
    output = np.array([n for _, n in requests])
    seconds = 0.0
    for step in range(output.max()):
        live = output > step
        seconds += (weight_bytes + float(((prompt + step) * live).sum()) * per_token) / bandwidth
    return {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes": weight_bytes,
            "kv_bytes_per_token": per_token, "output_tokens": int(output.sum()),
            "tok_s": round(output.sum() / seconds, 1)}


# -- batchd's engine ------------------------------------------------------------------------

def make_engine(model, slots: int, max_context: int, device: str, max_prefill_tokens: int = 2048,
                compile_decode: bool = False, overlap: bool | None = None,
                cuda_graph_sizes: tuple[int, ...] | None = None) -> HFEngine:
    loaded = LoadedModel(model=model, tokenizer=word_tokenizer(model.config.vocab_size),
                         name=f"{model.config.model_type}-random")
    return HFEngine(loaded, slots=slots, max_context=max_context, max_prefill_tokens=max_prefill_tokens,
                    attention="flex" if device != "cpu" else "sdpa", compile_decode=compile_decode, overlap=overlap,
                    cuda_graph_sizes=cuda_graph_sizes)


class _WaitClock:
    """Seconds the host spends blocked on the GPU reading tokens back: near the step time
    when the GPU is the bottleneck, near zero when the host is."""

    def __init__(self):
        from batchd.workers.hf.engine import _Launched

        self.seconds, self._launched, self._read = 0.0, _Launched, _Launched.read

    def __enter__(self):
        clock, read = self, self._read

        def timed(launched):
            started = time.perf_counter()
            try:
                return read(launched)
            finally:
                clock.seconds += time.perf_counter() - started

        self._launched.read = timed
        return self

    def __exit__(self, *exc):
        self._launched.read = self._read


def run_engine(engine: HFEngine, requests, device: str, label: str) -> dict:
    engine.reset_prefix_cache()  # no phase reads the prompts an earlier one left cached
    for index, (prompt, output) in enumerate(requests):
        engine.add(EngineRequest(f"{label}{index}", prompt, SamplingParams(max_new_tokens=output, ignore_eos=True)))
    tokens, steps = 0, 0
    _sync(device)
    started = time.perf_counter()
    with _WaitClock() as waited:
        while engine.has_work():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            steps += 1
            if steps % 200 == 0:
                log.info("  %s: %d steps, %d tokens, %.1fs", label, steps, tokens, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return {"requests": len(requests), "output_tokens": tokens, "seconds": round(seconds, 2),
            "steps": steps, "tok_s": round(tokens / seconds, 1), "overlap": engine.overlap,
            "host_waiting_on_gpu_s": round(waited.seconds, 2)}


def host_syncs(engine: HFEngine, requests, steps: int = 60) -> dict:
    """Steps under torch's sync debug mode: every call that makes the host wait on the GPU
    warns. The design allows one per step (reading the sampled tokens back)."""
    import warnings

    for index, (prompt, output) in enumerate(requests):
        engine.add(EngineRequest(f"sync{index}", prompt, SamplingParams(max_new_tokens=output, ignore_eos=True)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    for index in range(len(requests)):
        engine.cancel(f"sync{index}")
    while engine.has_work():
        engine.step()
    return {"steps": steps, "sync_warnings": len(caught), "distinct": messages[:8]}


def engine_latency(engine: HFEngine, requests, rate: float, device: str, seed: int = 1) -> dict:
    """TTFT (arrival to first token) and ITL (gap between a request's tokens) with requests
    arriving as a Poisson process, and the output tokens/s delivered."""
    engine.reset_prefix_cache()  # no phase reads the prompts an earlier one left cached
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(requests)))
    pending = list(enumerate(requests))
    first, last, gaps, tokens = {}, {}, [], 0
    started = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - started
        while pending and arrivals[pending[0][0]] <= now:
            index, (prompt, output) = pending.pop(0)
            engine.add(EngineRequest(f"r{index}", prompt, SamplingParams(max_new_tokens=output, ignore_eos=True)))
        if not engine.has_work():
            time.sleep(0.0005)
            continue
        outputs = engine.step()
        now = time.perf_counter() - started
        for out in outputs:
            if not out.new_token_ids:  # a finish with no token of its own
                continue
            index = int(out.request_id[1:])
            tokens += len(out.new_token_ids)
            if index not in first:
                first[index] = now - arrivals[index]
            else:
                gaps.append(now - last[index])
            last[index] = now
    seconds = time.perf_counter() - started
    ttft, itl = np.array(list(first.values())) * 1e3, np.array(gaps) * 1e3
    return {"rate_per_s": rate, "requests": len(requests), "tok_s": round(tokens / seconds, 1),
            "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 1), "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 1),
            "itl_ms_p50": round(float(np.percentile(itl, 50)), 2), "itl_ms_p99": round(float(np.percentile(itl, 99)), 2)}


def decode_step_by_live(engine: HFEngine, requests, device: str, live_counts=(1, 4, 8, 16, 32, 64, 128, 256),
                        steps: int = 40) -> dict:
    """A pure decode step's time for each number of live requests: replaying the smallest
    CUDA graph that holds them (the default) against the graph over every slot.

    Requests have the workload's prompts and run long enough that the measured steps are
    all decode; both ways time the same steps of the same requests."""
    every_size = engine.cuda_graph_sizes
    if not every_size:
        return {"skipped": "this engine replays no CUDA graphs"}
    steps = min(steps, (engine.max_context - max(len(p) for p, _ in requests)) // 2 - 8)
    table = []
    for live in live_counts:
        if live > engine.total_slots:
            continue
        for index, (prompt, _) in enumerate(requests[:live]):
            engine.add(EngineRequest(f"live{live}_{index}", prompt,
                                     SamplingParams(max_new_tokens=2 * steps + 16, ignore_eos=True)))
        while engine.num_waiting or engine.num_prefilling:
            engine.step()
        for _ in range(3):
            engine.step()
        # The two ways take turns in short blocks (A B B A ...): requests grow a token each
        # step, so timing one way's steps all before the other's would favour the first.
        ways = {"smallest_graph_ms": every_size, "all_slots_graph_ms": every_size[-1:]}
        seconds = dict.fromkeys(ways, 0.0)
        for block in range(steps // 5):
            for name in (list(ways) if block % 2 == 0 else list(ways)[::-1]):
                engine.use_cuda_graph_sizes(ways[name])
                _sync(device)
                started = time.perf_counter()
                for _ in range(5):
                    engine.step()
                _sync(device)
                seconds[name] += time.perf_counter() - started
        engine.use_cuda_graph_sizes(every_size)
        row = {"live": live, **{name: round(total / (steps // 5 * 5) * 1e3, 3) for name, total in seconds.items()}}
        row["graph_rows"] = next(rows for rows in every_size if rows >= live)
        table.append(row)
        log.info("  %s", row)
        for index in range(live):
            engine.cancel(f"live{live}_{index}")
        while engine.has_work():
            engine.step()
    return {"steps_each": steps, "table": table}


def with_one_graph(engine: HFEngine, work):
    """Run work() replaying only the decode graph over every slot, as the engine did before
    it had smaller ones: what they change, on the same engine."""
    every_size = engine.cuda_graph_sizes
    engine.use_cuda_graph_sizes(every_size[-1:])
    try:
        return {**work(), "cuda_graph_sizes": every_size[-1:]}
    finally:
        engine.use_cuda_graph_sizes(every_size)


def greedy_agreement(engine: HFEngine, model, requests, tokens: int) -> dict:
    """How many leading tokens match HF generate; bf16 batch-order rounding may make them drift."""
    run = {}
    for index, (prompt, _) in enumerate(requests):
        engine.add(EngineRequest(f"agree{index}", prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True)))
        run[f"agree{index}"] = []
    while engine.has_work():
        for out in engine.step():
            run[out.request_id] += out.new_token_ids
    matched = []
    for index, (prompt, _) in enumerate(requests):
        expected = hf_generate(model, [prompt], tokens)[0]
        got = run[f"agree{index}"]
        matched.append(next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), tokens))
    return {"tokens_each": tokens, "matching_prefix": matched}


def exactness_check(device: str, compile_decode: bool, count: int = 24) -> dict:
    """A tiny float32 Qwen3 through the same engine path (flex, CUDA graph): greedy must equal generate."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(1)
    with torch.device(device):
        tiny = AutoModelForCausalLM.from_config(qwen3_config(small=True), dtype=torch.float32).eval()
    tiny.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    # 16 slots and 24 requests: decode steps run from 16 requests down to 1, so both
    # decode graphs (8 and 16 rows) are replayed.
    engine = make_engine(tiny, slots=16, max_context=256, device=device, compile_decode=compile_decode,
                         cuda_graph_sizes=(8, 16))
    requests = workload(count, 5, 60, tiny.config.vocab_size, seed=3)
    outputs = {f"x{i}": [] for i in range(count)}
    for index, (prompt, output) in enumerate(requests):
        engine.add(EngineRequest(f"x{index}", prompt, SamplingParams(max_new_tokens=output, ignore_eos=True)))
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    identical = sum(outputs[f"x{i}"] == hf_generate(tiny, [p], n)[0] for i, (p, n) in enumerate(requests))
    return {"requests": count, "token_identical": identical,
            "cuda_graph_sizes": engine.cuda_graph_sizes, "compile_decode": compile_decode}


def _python_profile(engine: HFEngine, device: str) -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    engine.step()
    _sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def profile_steps(engine: HFEngine, requests, device: str, out_dir: Path) -> dict:
    """Where a step's time goes: per-step wall times, and profiler tables for a prefill and a decode step."""
    from torch.profiler import ProfilerActivity, profile

    for index, (prompt, output) in enumerate(requests):
        engine.add(EngineRequest(f"prof{index}", prompt, SamplingParams(max_new_tokens=output, ignore_eos=True)))
    step_ms, live = [], []
    tables = {}
    for step in range(320):
        if step in (10, 301):
            tables[f"python_step{step}"] = _python_profile(engine, device)
            continue
        if step in (8, 300):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                _sync(device)
            name = "prefill_step" if step == 8 else "decode_step"
            tables[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            tables[name + "_cpu"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=20)
            continue
        started = _now(device)
        engine.step()
        step_ms.append((_now(device) - started) * 1e3)
        live.append(engine.num_running)
    for index in range(len(requests)):
        engine.cancel(f"prof{index}")
    while engine.has_work():
        engine.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        (out_dir / f"profile_{name}.txt").write_text(table)
    return {"step_ms_first_80": [round(x, 1) for x in step_ms[:80]],
            "step_ms_200_to_300": [round(x, 1) for x in step_ms[200:300]], "live": live[::10]}


# -- peers -------------------------------------------------------------------------------

def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy generate on a left-padded batch, exactly new_tokens each."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def hf_sequential(model, requests, cap: int, device: str) -> dict:
    hf_generate(model, [requests[0][0][:32]], 4)  # warm-up
    tokens, seconds = 0, 0.0
    for prompt, output in requests:
        new = min(output, cap)
        started = _now(device)
        hf_generate(model, [prompt], new)
        seconds += _now(device) - started
        tokens += new
    return {"requests": len(requests), "output_tokens_each_capped_at": cap, "output_tokens": tokens,
            "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 2),
            "note": "subset with capped outputs; one request at a time does not depend on the others"}


def hf_static_batches(model, requests, steps: int, device: str, batch: int = 16) -> dict:
    """Time one batch of 16 (prefill, then `steps` decode steps) and extrapolate to all batches."""
    first = [p for p, _ in requests[:batch]]
    hf_generate(model, first, 2)  # warm-up
    started = _now(device)
    hf_generate(model, first, 1)
    prefill = _now(device) - started
    started = _now(device)
    hf_generate(model, first, steps + 1)
    per_step = (_now(device) - started - prefill) / steps
    groups = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    # A static batch runs until its longest output is done; shorter ones wait padded.
    estimate = sum(prefill + max(n for _, n in g) * per_step for g in groups)
    tokens = sum(n for _, n in requests)
    return {"batch": batch, "prefill_s": round(prefill, 3), "decode_step_ms": round(per_step * 1e3, 2),
            "estimated_seconds": round(estimate, 1), "output_tokens": tokens, "tok_s": round(tokens / estimate, 1),
            "note": f"estimate: prefill and {steps} decode steps of the first batch, extrapolated to "
                    f"{len(groups)} batches at each batch's longest output"}


def transformers_cb(model, requests, device: str) -> dict:
    """transformers' continuous batching, tuned per BENCHMARKS.md (paged|sdpa, CUDA graphs)."""
    from transformers import GenerationConfig

    options = {"num_blocks": 1400, "block_size": 256, "max_batch_tokens": 2048, "max_requests_per_batch": 64,
               "use_cuda_graph": True, "kv_padding_interval_size": 4096}
    model.set_attn_implementation("paged|sdpa")
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1024)
    manager = _cb_manager(model, generation, options)
    manager.start()
    try:
        started = time.perf_counter()
        ids = [manager.add_request(prompt, max_new_tokens=output) for prompt, output in requests]
        tokens, done = 0, 0
        while done < len(ids):
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                done += 1
                tokens += len(result.generated_tokens)
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    return {"requests": len(requests), "output_tokens": tokens, "seconds": round(seconds, 2),
            "tok_s": round(tokens / seconds, 1), "settings": options, "attn_implementation": "paged|sdpa"}


def _cb_manager(model, generation, options: dict):
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:  # older transformers read these settings from the GenerationConfig
        for key, value in options.items():
            setattr(generation, key, value)
        return model.init_continuous_batching(generation_config=generation)
    fields = ContinuousBatchingConfig.__dataclass_fields__
    config = ContinuousBatchingConfig(**{k: v for k, v in options.items() if k in fields})
    if "auto_switch_to_flash" in fields:
        config.auto_switch_to_flash = False  # flash-attn is not installed; stay on paged|sdpa
    return model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)


# -- plumbing ----------------------------------------------------------------------------

def _free_engine_memory(device: str) -> None:
    """The engine's cache is most of the GPU: peers and the next engine need it back."""
    import gc

    torch._dynamo.reset()  # compiled code guards on the engine and would keep it alive
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        log.info("GPU memory in use after freeing the engine: %.1f GiB", torch.cuda.memory_allocated() / 2**30)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _now(device: str) -> float:
    _sync(device)
    return time.perf_counter()


class Report:
    def __init__(self, path: str, meta: dict):
        self.path = Path(path)
        self.data = {"benchmark": "engine_gpu", **meta, "phases": {}}

    def phase(self, name: str, work) -> None:
        log.info("phase %s ...", name)
        started = time.perf_counter()
        try:
            self.data["phases"][name] = work()
        except Exception as exc:  # noqa: BLE001 - one broken peer must not lose the others' numbers
            self.data["phases"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        self.data["phases"][name]["wall_s"] = round(time.perf_counter() - started, 1)
        log.info("phase %s: %s", name, {k: v for k, v in self.data["phases"][name].items() if k != "trace"})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def run_engine_phases(report: Report, model, requests, args, device: str, suffix: str, compiled: bool,
                      overlap: bool | None, wanted: list[str], high: int) -> None:
    """One engine (plain or with compiled decode layers) through the engine phases, then freed."""
    started = time.perf_counter()
    engine = make_engine(model, slots=len(requests), max_context=2 * high, device=device,
                         max_prefill_tokens=args.max_prefill_tokens, compile_decode=compiled, overlap=overlap)
    report.data[f"engine{suffix}_start_s"] = round(time.perf_counter() - started, 1)
    report.data[f"engine{suffix}_cuda_graph_sizes"] = engine.cuda_graph_sizes
    report.data["max_prefill_tokens"] = args.max_prefill_tokens
    run_engine(engine, requests[:4], device, "warm")  # first-call setup stays out of the numbers
    latency_requests = requests[:args.latency_requests]
    work = {
        "syncs": lambda: host_syncs(engine, requests),
        "profile": lambda: profile_steps(engine, requests, device, Path(args.out).parent),
        "engine": lambda: run_engine(engine, requests, device, "anchor"),
        "latency": lambda: engine_latency(engine, latency_requests, args.rate, device),
        "engine_one_graph": lambda: with_one_graph(engine, lambda: run_engine(engine, requests, device, "one_graph")),
        "latency_one_graph": lambda: with_one_graph(
            engine, lambda: engine_latency(engine, latency_requests, args.rate, device)),
        "step_by_live": lambda: decode_step_by_live(engine, requests, device),
        "agreement": lambda: greedy_agreement(engine, model, requests[:3], 32),
    }
    for name in wanted:  # in the order --phases gives
        report.phase(name + suffix, work[name])


ENGINE_PHASES = ("engine", "engine_one_graph", "latency", "latency_one_graph", "step_by_live", "agreement",
                 "profile", "syncs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny model and workload, to check the script")
    parser.add_argument("--shape", choices=("qwen3-0.6b", "llama3-8b"), default="qwen3-0.6b",
                        help="the model's shape (random weights); BENCHMARKS.md's anchor is qwen3-0.6b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--seq-requests", type=int, default=3)
    parser.add_argument("--seq-cap", type=int, default=96)
    parser.add_argument("--static-steps", type=int, default=48)
    parser.add_argument("--cb-requests", type=int, default=48)
    parser.add_argument("--latency-requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--max-prefill-tokens", type=int, default=8192,
                        help="prompt tokens per step; throughput engines use large budgets (nano-vllm 16384)")
    parser.add_argument("--phases", default="exactness_compiled,roofline,engine_compiled,"
                        "engine_one_graph_compiled,latency_compiled,latency_one_graph_compiled,"
                        "step_by_live_compiled,syncs_compiled,"
                        "agreement_compiled,engine_compiled_lockstep,hf_sequential,hf_static,transformers_cb")
    parser.add_argument("--out", default="benchmarks/results/engine_gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    low, high = (10, 40) if args.small else (100, 1024)
    device = args.device
    model = build_model(args.small, device, args.shape)
    requests = workload(args.requests, low, high, model.config.vocab_size)
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "model": "tiny Qwen3 (script check)" if args.small else f"{args.shape} shape, random weights",
            "dtype": str(next(model.parameters()).dtype), "requests": len(requests),
            "output_tokens": sum(n for _, n in requests), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = Report(args.out, meta)
    phases = args.phases.split(",")
    if "exactness" in phases:
        report.phase("exactness", lambda: exactness_check(device, compile_decode=False))
    if "exactness_compiled" in phases:
        report.phase("exactness_compiled", lambda: exactness_check(device, compile_decode=True))
    if "roofline" in phases:
        report.phase("roofline", lambda: roofline(requests, model, copy_bandwidth(device)))
    # (suffix, compiled layers, overlap); None: the device's default
    variants = (("", False, None), ("_compiled", True, None), ("_compiled_lockstep", True, False))
    for suffix, compiled, overlap in variants:
        wanted = [p[:len(p) - len(suffix)] for p in phases
                  if p.endswith(suffix) and p[:len(p) - len(suffix)] in ENGINE_PHASES]
        if wanted:
            try:
                run_engine_phases(report, model, requests, args, device, suffix, compiled, overlap, wanted, high)
            except Exception as exc:  # e.g. a compile failure while building the engine
                log.exception("engine%s could not start", suffix)
                failure = {"error": f"engine did not start: {type(exc).__name__}: {exc}"}
                report.phase("engine" + suffix, lambda failure=failure: failure)
            _free_engine_memory(device)
    if "hf_sequential" in phases:
        report.phase("hf_sequential", lambda: hf_sequential(model, requests[:args.seq_requests], args.seq_cap, device))
    if "hf_static" in phases:
        report.phase("hf_static", lambda: hf_static_batches(model, requests, args.static_steps, device))
    if "transformers_cb" in phases:
        report.phase("transformers_cb", lambda: transformers_cb(model, requests[:args.cb_requests], device))
    print_table(report.data)


def print_table(data: dict) -> None:
    phases = data["phases"]
    print(f"\n{data['device']}, {data['model']}, {data['requests']} requests, {data['output_tokens']} output tokens")
    rows = [("HBM roofline", "roofline"), ("batchd hf engine, decode not compiled", "engine"),
            ("batchd hf engine, compiled decode", "engine_compiled"),
            ("  the same, one decode graph (all slots)", "engine_one_graph_compiled"),
            ("  the same in lockstep (no overlap)", "engine_compiled_lockstep"),
            ("HF generate, one at a time", "hf_sequential"),
            ("HF generate, static batches of 16", "hf_static"), ("transformers CB, tuned", "transformers_cb")]
    engine = max(phases.get(k, {}).get("tok_s") or 0 for k in ("engine", "engine_compiled")) or None
    roof = phases.get("roofline", {}).get("tok_s")
    for label, key in rows:
        value = phases.get(key, {}).get("tok_s")
        if value is None:
            print(f"{label:<36} {'-':>10}  {phases.get(key, {}).get('error', 'not run')[:80]}")
            continue
        ratio = f"best engine = {engine / value:.2f}x" if engine and not key.startswith("engine") else ""
        if roof and key.startswith("engine"):
            ratio = f"{value / roof:.0%} of the roofline"
        print(f"{label:<36} {value:>10} tok/s  {ratio}")
    syncs = phases.get("syncs_compiled", {})
    if "sync_warnings" in syncs:
        print(f"host syncs over {syncs['steps']} steps: {syncs['sync_warnings']} {syncs['distinct']}")
    for key in ("latency", "latency_compiled", "latency_one_graph_compiled"):
        lat = phases.get(key, {})
        if "ttft_ms_p50" not in lat:
            continue
        print(f"{key} at {lat['rate_per_s']}/s: TTFT p50 {lat['ttft_ms_p50']} ms p99 {lat['ttft_ms_p99']} ms, "
              f"ITL p50 {lat['itl_ms_p50']} ms p99 {lat['itl_ms_p99']} ms")
    by_live = phases.get("step_by_live_compiled", {}).get("table")
    if by_live:
        print(f"{'live requests':>13} {'graph rows':>10} {'smallest graph ms':>18} {'all-slots graph ms':>19} {'ratio':>6}")
        for row in by_live:
            print(f"{row['live']:>13} {row['graph_rows']:>10} {row['smallest_graph_ms']:>18} "
                  f"{row['all_slots_graph_ms']:>19} {row['all_slots_graph_ms'] / row['smallest_graph_ms']:>5.2f}x")


if __name__ == "__main__":
    main()
