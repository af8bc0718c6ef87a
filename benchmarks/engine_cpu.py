"""BENCHMARKS.md section 3: the hf engine against HF generate on this CPU, SmolLM2-135M.

For 1, 4, 8 and 16 concurrent requests: the engine serves them all at once
(continuous batching); the baseline runs HF `generate` on the same requests one
at a time. Both are greedy, so their tokens must be identical; the table says
whether they are. Each request's baseline time is measured per request and
summed per concurrency level, since one-at-a-time serving does not depend on
concurrency. Every time is the best of --repeats runs, with the baseline and the
engine runs interleaved: on a shared 2-core machine other processes only ever
add time, so the minimum is the least disturbed estimate (all samples are kept
in the JSON).

    .venv/bin/python benchmarks/engine_cpu.py [--max-new-tokens 48] [--repeats 2] [--out benchmarks/results/engine_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf import HFEngine
from batchd.workers.hf.models import load_model

PROMPTS = [
    "Once upon a time, in a village at the edge of a great forest,",
    "The history of the printing press begins",
    "Here is a short recipe for tomato soup:",
    "def quicksort(items):",
    "The three laws of thermodynamics are",
    "Dear hiring manager, I am writing to apply for",
    "In 1969, the first humans landed on the Moon. The mission",
    "A haiku about autumn leaves:",
    "The main differences between TCP and UDP are",
    "Photosynthesis is the process by which plants",
    "To install Python on Linux, first",
    "The city of Paris is famous for",
    "Chapter one. The storm had been building all afternoon, and",
    "Ten tips for better sleep: 1.",
    "import numpy as np\n\n# Compute the moving average of a signal",
    "The most important inventions of the twentieth century include",
]
CONCURRENCY = (1, 4, 8, 16)


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist(), time.perf_counter() - started


def engine_all_at_once(engine: HFEngine, prompts: list[list[int]], max_new_tokens: int):
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{index}", prompt, SamplingParams(max_new_tokens=max_new_tokens)))
    steps = 0
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
        steps += 1
    return [tokens[f"r{i}"] for i in range(len(prompts))], time.perf_counter() - started, steps


def _row(concurrency: int, baseline, engine_runs) -> dict:
    expected = [runs[0][0] for runs in baseline]
    hf_s = sum(min(seconds for _, seconds in runs) for runs in baseline)
    engine_s = min(seconds for _, seconds, _ in engine_runs)
    count = sum(map(len, expected))
    identical = all(outputs == expected for outputs, _, _ in engine_runs) and \
        all(tokens == runs[0][0] for runs in baseline for tokens, _ in runs)
    return {
        "concurrency": concurrency, "output_tokens": count, "engine_steps": engine_runs[0][2],
        "hf_generate_s": round(hf_s, 3), "engine_s": round(engine_s, 3),
        "hf_generate_tok_s": round(count / hf_s, 2), "engine_tok_s": round(count / engine_s, 2),
        "speedup": round(hf_s / engine_s, 2), "token_identical": identical,
        "engine_s_samples": [round(seconds, 3) for _, seconds, _ in engine_runs],
        "hf_generate_s_samples": [round(sum(runs[i][1] for runs in baseline), 3) for i in range(len(engine_runs))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/engine_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = load_model(args.model, device="cpu")
    engine = HFEngine(loaded, slots=max(CONCURRENCY), max_context=512)
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    load_before = os.getloadavg()

    engine_all_at_once(engine, prompts[:2], 4)  # warm-up: first-call kernel setup stays out of the numbers
    hf_generate(loaded.model, prompts[0], 4)
    baseline: list[list[tuple[list[int], float]]] = [[] for _ in prompts]
    engine_runs: dict[int, list[tuple[list[list[int]], float, int]]] = {c: [] for c in CONCURRENCY}
    for repeat in range(args.repeats):
        measured = 0
        for concurrency in CONCURRENCY:
            # The baseline for the requests this level adds, then the engine on all of them.
            for index in range(measured, concurrency):
                baseline[index].append(hf_generate(loaded.model, prompts[index], args.max_new_tokens))
            measured = concurrency
            engine_runs[concurrency].append(engine_all_at_once(engine, prompts[:concurrency], args.max_new_tokens))
            print(f"  repeat {repeat + 1}/{args.repeats}, {concurrency:2d} concurrent: HF generate "
                  f"{sum(b[-1][1] for b in baseline[:concurrency]):.1f}s, engine {engine_runs[concurrency][-1][1]:.1f}s",
                  flush=True)
    rows = [_row(c, baseline[:c], engine_runs[c]) for c in CONCURRENCY]

    report = {
        "benchmark": "engine_cpu", "model": loaded.name, "dtype": "float32", "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    print(f"wrote {args.out}")


def print_table(rows: list[dict]) -> None:
    print(f"\n{'concurrent':>10} {'tokens':>7} {'HF generate tok/s':>18} {'engine tok/s':>13} {'speedup':>8} {'identical':>9}")
    for row in rows:
        print(f"{row['concurrency']:>10} {row['output_tokens']:>7} {row['hf_generate_tok_s']:>18} "
              f"{row['engine_tok_s']:>13} {row['speedup']:>7}x {row['token_identical']!s:>9}")


if __name__ == "__main__":
    main()
