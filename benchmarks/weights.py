"""Weights in less memory: what --dtype and --quantize int8 / fp8 cost and save, through the hf engine.

For each weight format, the same greedy workload runs through the engine (all
requests at once); the table gives the weights' memory, output tokens/s, and
how closely the greedy tokens agree with the reference format (float32 on the
CPU, bfloat16 on CUDA): the share of requests whose whole output is identical,
and the mean share of each output that matches before the first difference;
and, on a fixed text read by the model (teacher-forced), the mean absolute
difference of each token's log-probability from the reference format's.

    .venv/bin/python benchmarks/weights.py                          # SmolLM2 on this CPU
    python benchmarks/weights.py --device cuda --model /models/Qwen3-0.6B --formats bf16,fp16,int8

int8 needs torchao (the `int8` extra; on a GPU machine without it, carry its wheel).
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
from batchd.workers.hf import quant
from batchd.workers.hf.models import load_model, weight_bytes

# The prompts of the CPU engine benchmark (benchmarks/ is on sys.path when run as a script).
from engine_cpu import PROMPTS  # noqa: E402

# format name -> (dtype, quantize)
FORMATS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "fp16": ("float16", "none"),
           "int8": (None, "int8"), "fp8": (None, "fp8"), "fp8_tensor": (None, "fp8"),
           "kv_fp8": (None, "none")}
# Formats of the KV cache rather than the weights: their text log-probabilities come from the
# engine (a scoring request over the pool), where the cache is, not from the model's own forward.
KV_FORMATS = {"kv_fp8": "fp8"}

# The fixed text for log-probabilities: plain English prose, ~200 tokens.
TEXT = ("The river had been rising for three days when the ferryman finally tied his boat to the old oak "
        "and walked up the hill to the village. Nobody there remembered a flood like it. The bakery had "
        "moved its ovens to the upper floor, the school had closed, and the children spent the mornings "
        "watching the brown water carry fences, barrels and once a whole henhouse past the church. In the "
        "evenings the grown-ups gathered in the hall and argued about whether to build a wall or to move "
        "the houses, and every evening the argument ended where it had begun. On the fourth day the rain "
        "stopped, the sun came out over the hills, and the river, as if embarrassed, began to fall.")


def run_engine(engine: HFEngine, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{index}", prompt, SamplingParams(max_new_tokens=max_new_tokens,
                                                                     ignore_eos=True)))
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return [tokens[f"r{i}"] for i in range(len(prompts))], time.perf_counter() - started


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of outputs identical to the reference, mean share matching before the first difference)."""
    identical, prefix = 0, 0.0
    for out, ref in zip(outputs, reference):
        same = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        identical += out == ref
        prefix += same / max(1, len(ref))
    return identical / len(reference), prefix / len(reference)


@torch.inference_mode()
def text_logprobs(loaded) -> torch.Tensor:
    """Each token's log-probability given the ones before it, the fixed text read whole."""
    ids = torch.tensor([loaded.tokenizer(TEXT)["input_ids"]], device=next(loaded.model.parameters()).device)
    logits = loaded.model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].cpu()


def engine_text_logprobs(engine: HFEngine, loaded) -> torch.Tensor:
    """The same log-probabilities from the engine: one scoring request, the text after its first token."""
    from batchd.workers.engine import ScoreItem

    ids = loaded.tokenizer(TEXT)["input_ids"]
    item = ScoreItem(prompt_token_ids=ids[:1], continuation_token_ids=ids[1:])
    engine.add_score(EngineRequest("text", ids, SamplingParams(max_new_tokens=1)), item)
    score = None
    while engine.has_work():
        for output in engine.step():
            score = output.score or score
    return torch.tensor(score.token_logprobs)


def measure(args, name: str, reference: list[list[int]] | None):
    dtype, quantize = FORMATS[name]
    # fp8 as it ships scales activations per row; fp8_tensor once per step
    quant.ACTIVATION_SCALES = "tensor" if name == "fp8_tensor" else "row"
    if dtype is None:
        dtype = args.activations
    loaded = load_model(args.model, dtype=dtype, device=args.device, quantize=quantize)
    engine = HFEngine(loaded, slots=len(PROMPTS), max_context=args.max_context, kv_dtype=KV_FORMATS.get(name))
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    run_engine(engine, prompts[:2], 4)  # warm-up: kernels, graphs, allocator
    best, outputs = float("inf"), None
    for _ in range(args.repeats):
        outputs, seconds = run_engine(engine, prompts, args.max_new_tokens)
        best = min(best, seconds)
    row = {"format": name, "weights": loaded.weights, "weight_mib": weight_bytes(loaded.model) / 2**20,
           "kv_dtype": engine.kv_dtype, "tokens_per_s": sum(map(len, outputs)) / best, "seconds": best}
    if reference is not None:
        row["identical"], row["matching_prefix"] = agreement(outputs, reference)
    logprobs = engine_text_logprobs(engine, loaded) if name in KV_FORMATS else text_logprobs(loaded)
    row["text_mean_logprob"] = logprobs.mean().item()
    if args.reference_logprobs is not None:
        row["text_logprob_mean_abs_diff"] = (logprobs - args.reference_logprobs).abs().mean().item()
    else:
        args.reference_logprobs = logprobs
    del engine, loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", default=None, help="comma-separated, reference first "
                        "(default: fp32,bf16,int8,fp8 on CPU; bf16,fp16,int8,fp8,fp8_tensor on CUDA)")
    parser.add_argument("--activations", default=None, help="dtype beside int8 weights (default: the reference's)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/weights_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    formats = (args.formats or ("fp32,bf16,int8,fp8" if args.device == "cpu" else "bf16,fp16,int8,fp8,fp8_tensor")).split(",")
    args.activations = args.activations or FORMATS[formats[0]][0]
    rows, reference, args.reference_logprobs = [], None, None
    for name in formats:
        print(f"{name}: loading and running {len(PROMPTS)} requests x {args.max_new_tokens} tokens...", flush=True)
        row, outputs = measure(args, name, reference)
        reference = reference or outputs
        rows.append(row)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\n{args.model} on {device}, {len(PROMPTS)} concurrent requests, {args.max_new_tokens} greedy tokens each; "
          f"agreement with {formats[0]}")
    print("| format | weights | weight MiB | output tok/s | outputs identical | matching prefix "
          "| text log-prob/token | mean abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        agree = (f"{row['identical']:.0%} | {row['matching_prefix']:.0%}" if "identical" in row
                 else "(reference) | (reference)")
        diff = f"{row['text_logprob_mean_abs_diff']:.4f}" if "text_logprob_mean_abs_diff" in row else "(reference)"
        print(f"| {row['format']} | {row['weights']} | {row['weight_mib']:.0f} | {row['tokens_per_s']:.1f} | {agree} "
              f"| {row['text_mean_logprob']:.3f} | {diff} |")
    result = {"model": args.model, "device": device, "torch": torch.__version__, "time": time.time(),
              "load_average": os.getloadavg(), "max_new_tokens": args.max_new_tokens, "requests": len(PROMPTS),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
