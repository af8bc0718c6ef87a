"""The engine's host work per step, with the model taken out.

A GPU step overlaps the host's work for the next step (scheduling, admission, reading
tokens back, detokenising, building outputs) with the device's work on this one, so a
step costs the larger of the two. Issue 15's sustained workload showed a float8 KV cache,
which halves the attention's reads, leaving throughput unchanged: a sign that its steps
wait on the host, not the GPU. This measures the host's share on any machine: the engine
(256 slots, overlap on, as on a GPU) drives the sustained workload (1,024 requests,
prompt and output U[100, 1024], blocks of 128 tokens) while its runner's forward pass is a stub returning
logits of zeros, so what is timed is everything but the model and the runner's own
table updates. Steps are sorted by the prompt tokens they carried, as
serving_gpu.py's sustained phase sorts them, and the largest cProfile entries of the
whole run are kept.

    python benchmarks/engine_host.py --out benchmarks/results/engine_host.json
    python benchmarks/engine_host.py --requests 200 --profile    # a quick look, with a profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import time
from pathlib import Path

import torch
from engine_gpu import build_model, workload
from serving_gpu import StepLog, _add, make_engine

log = logging.getLogger("engine_host")


def stub_forward(runner, vocab: int):
    """A forward pass that computes nothing: for every logit row asked for, a row whose largest
    entry is at a random token (not a constant one: token 0 is the tokenizer's unknown
    token, which decodes to nothing and would make every detokenizer window grow)."""
    generator = torch.Generator().manual_seed(0)

    def forward(chunks, previous=None):
        rows = [chunk for chunk in chunks for _ in chunk.logit_rows()]
        logits = torch.zeros(len(rows), vocab)
        logits[torch.arange(len(rows)), torch.randint(1, vocab, (len(rows),), generator=generator)] = 1.0
        return logits, rows

    runner.forward = forward


def run(args) -> dict:
    model = build_model(True, "cpu")  # the tiny Qwen3: its weights are never used
    vocab = model.config.vocab_size
    # The GPU's block size: blocks fill, and are keyed for the prefix cache, as often as there.
    engine = make_engine(model, "cpu", slots=args.slots, max_context=4096, overlap=True, block_size=128,
                         max_prefill_tokens=args.max_prefill_tokens, burst_prefill_tokens=args.burst_prefill_tokens,
                         kv_memory=args.slots * 4096 * _kv_bytes(model))
    stub_forward(engine._runner, vocab)
    requests = workload(args.requests, 100, 1024, vocab, seed=1)
    _add(engine, "h", requests, temperature=args.temperature)
    steps = StepLog(engine)
    profiler = cProfile.Profile() if args.profile else None
    tokens, count = 0, 0
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    while engine.has_work():
        emitted = sum(len(o.new_token_ids) for o in engine.step())
        tokens += emitted
        count += 1
        steps.record(engine, emitted)
        if count % 500 == 0:
            log.info("%d steps, %d tokens, %.1f s", count, tokens, time.perf_counter() - started)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    result = {"requests": args.requests, "slots": args.slots, "temperature": args.temperature, "steps": count, "output_tokens": tokens,
              "seconds": round(seconds, 2), "host_ms_per_step": round(seconds / count * 1e3, 3),
              "profiled": bool(profiler), "steps_by_prompt_tokens": steps.summary()}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = text.getvalue()
    return result


def _kv_bytes(model) -> int:
    from batchd.workers.hf.kv_cache import kv_bytes_per_token

    return kv_bytes_per_token(model.config, torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--max-prefill-tokens", type=int, default=512, help="the GPU default")
    parser.add_argument("--burst-prefill-tokens", type=int, default=2048, help="the GPU default")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: every request sampled (no seed)")
    parser.add_argument("--profile", action="store_true", help="run under cProfile (slower) and keep its top entries")
    parser.add_argument("--out", default="benchmarks/results/engine_host.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = {"benchmark": "engine_host", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "torch": torch.__version__, **run(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['steps']} steps, {result['output_tokens']} tokens in {result['seconds']} s: "
          f"{result['host_ms_per_step']} ms of host work a step")
    for bucket in result["steps_by_prompt_tokens"]:
        print(f"  steps with {bucket['prompt_tokens']:>9} prompt tokens: {bucket['steps']:>5} steps, "
              f"{bucket['ms_per_step']} ms each, {bucket['mean_running']} running, {bucket['mean_emitted']} emitted")
    if "profile" in result:
        print(result["profile"])


if __name__ == "__main__":
    main()
