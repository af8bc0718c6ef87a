"""The long-context workload's admission replayed through the scheduler alone: how many requests
run at once for each prompt budget. No model: each step "samples" one token per row asking.

BENCHMARKS.md section 5: a pool of 40 GiB of Qwen3-0.6B KV (374,272 tokens, blocks of 128),
128 requests, prompts U[100, 6000], outputs U[100, 1024] (numpy seed 5, as
benchmarks/serving_gpu.py's long_context phase), 128 slots. On 2026-12-03 the H200 run at a
512-token budget held 95 at once in 1,733 steps; this replay gives 95 in 1,732, so the
scheduler, not the GPU, sets the figure.

    .venv/bin/python benchmarks/admission_replay.py [--budgets 512,1024,2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf.blocks import BlockManager
from batchd.workers.hf.scheduler import Scheduler
from batchd.workers.hf.sequence import Sequence, Status

POOL_TOKENS, BLOCK = 374_272, 128


def replay(budget: int, prompts, outputs) -> dict:
    scheduler = Scheduler(BlockManager(POOL_TOKENS // BLOCK + 1, BLOCK), len(prompts), budget)
    rng = np.random.default_rng(0)
    sequences = [Sequence(EngineRequest(f"l{i}", rng.integers(0, 150_000, int(p)).tolist(),
                                        SamplingParams(max_new_tokens=int(o))), None, frozenset())
                 for i, (p, o) in enumerate(zip(prompts, outputs))]
    for sequence in sequences:
        scheduler.add(sequence)
    most, steps = 0, 0
    while any(s.status is not Status.FINISHED for s in sequences):
        plan = scheduler.schedule()
        scheduler.launched(plan)
        steps += 1
        most = max(most, len(scheduler.running))
        for sequence, chunk in zip(plan.sequences, plan.chunks):
            if chunk.want_logits:
                sequence.generated.append(1)
                sequence.token_ids.append(1)
                scheduler.learn(sequence)
                if len(sequence.generated) == sequence.request.params.max_new_tokens:
                    scheduler.finish(sequence)
        if steps % 500 == 0:
            print(f"  budget {budget}: step {steps}, {len(scheduler.running)} running", flush=True)
    return {"budget": budget, "most_live": most, "steps": steps, "preemptions": scheduler.stats.preemptions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="512,1024,2048")
    parser.add_argument("--out", default="benchmarks/results/admission_replay.json")
    args = parser.parse_args()
    np.random.seed(5)
    prompts, outputs = np.random.randint(100, 6001, 128), np.random.randint(100, 1025, 128)
    rows = [replay(int(b), prompts, outputs) for b in args.budgets.split(",")]
    print(f"{'budget':>7} {'most live':>9} {'steps':>6} {'preemptions':>11}")
    for row in rows:
        print(f"{row['budget']:>7} {row['most_live']:>9} {row['steps']:>6} {row['preemptions']:>11}")
    with open(args.out, "w") as handle:
        json.dump({"pool_tokens": POOL_TOKENS, "block_size": BLOCK, "requests": 128, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
