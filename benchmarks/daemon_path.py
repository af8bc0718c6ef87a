"""The anchor workload submitted through Redis: client -> scheduler -> worker, against the engine alone.

Issue 4 asks that serving through the daemons lose at most 10% against the
engine alone. This script starts an embedded server, one scheduler and one hf
worker as real processes, submits every request of the workload at once with
AsyncClient, and reports output tokens/s, TTFT and inter-token latency as the
producers saw them. Run engine_gpu.py in the same command for the engine-alone
figure.

    python benchmarks/daemon_path.py --device cuda
    python benchmarks/daemon_path.py --small --requests 16 --device cpu      # a smoke run on a laptop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The workload and model shape are engine_gpu.py's, so the two runs compare like for like.
from engine_gpu import qwen3_config, workload  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def make_checkpoint(directory: Path, small: bool, dtype: str) -> Path:
    """A random-weight Qwen3 checkpoint folder with the benchmark's shape (no download)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = qwen3_config(small)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)
    _save_tokenizer(directory, config.vocab_size)
    return directory


def _save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer so the worker can load the folder; prompts are token ids anyway."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["<eos>"] = vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(directory)


async def submit_all(url: str, prompts, outputs, progress: bool) -> dict:
    from batchd import AsyncClient
    from batchd.bench import percentiles
    from batchd.client import Delta

    ttfts, gaps, tokens = [], [], 0
    done = 0

    async def one(prompt, max_new_tokens):
        nonlocal tokens, done
        start = time.perf_counter()
        last = None
        async for item in client.stream(prompt_token_ids=prompt, max_new_tokens=max_new_tokens, ignore_eos=True,
                                        timeout=3600):
            now = time.perf_counter()
            if isinstance(item, Delta) and item.token_ids:
                if last is None:
                    ttfts.append(now - start)
                else:
                    gaps.append((now - last) / len(item.token_ids))
                last = now
            elif not isinstance(item, Delta):
                tokens += item.usage.completion_tokens
        done += 1
        if progress and done % max(1, len(prompts) // 10) == 0:
            print(f"  {done}/{len(prompts)} requests done", file=sys.stderr, flush=True)

    async with AsyncClient(url) as client:
        began = time.perf_counter()
        await asyncio.gather(*(one(p, n) for p, n in zip(prompts, outputs)))
        wall = time.perf_counter() - began
    ttft, itl = percentiles(ttfts), percentiles(gaps)
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "ttft_p50_s": ttft["p50"], "ttft_p99_s": ttft["p99"], "itl_p50_s": itl["p50"], "itl_p99_s": itl["p99"]}


def engine_alone(model_dir: Path, args, dtype: str, prompts, outputs) -> dict:
    """The same workload straight into an in-process engine: the figure the daemons are held to."""
    import torch

    from batchd.client.protocol import SamplingParams
    from batchd.workers.engine import EngineRequest
    from batchd.workers.hf import build_engine

    engine = build_engine(str(model_dir), slots=args.slots, max_context=args.max_context,
                          max_prefill_tokens=args.max_prefill_tokens, dtype=dtype, device=args.device)

    def run(engine, prompts, outputs) -> tuple[int, float]:
        for i, (prompt, n) in enumerate(zip(prompts, outputs)):
            engine.add(EngineRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        began, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        return tokens, time.perf_counter() - began

    # First-call setup (compilation, graphs) stays out of the figure. The warm-up prompts are
    # the first four reversed: the workload's own would stay cached in their slots and let the
    # measured run skip them (prefix reuse), which the worker's run cannot.
    run(engine, [p[::-1] for p in prompts[:4]], outputs[:4])
    tokens, wall = run(engine, prompts, outputs)
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny model and workload, to check the script")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192, help="as engine_gpu.py")
    parser.add_argument("--worker-args", default="", help="extra worker flags, space separated")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the engine, alone and in the worker (OMP_NUM_THREADS); on a small "
                             "CPU-only machine 1 leaves a core to the client and Redis, as a GPU host would")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/daemon_path.json"))
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    shape = "tiny" if args.small else "qwen3-0.6b"
    model_dir = make_checkpoint(args.model_dir or Path(f"/tmp/batchd-bench-{shape}"), args.small, dtype)
    low, high = (10, 40) if args.small else (100, 1024)
    requests = workload(args.requests, low, high, qwen3_config(args.small).vocab_size)
    prompts, outputs = [p for p, _ in requests], [n for _, n in requests]

    worker_env = dict(os.environ)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        worker_env["OMP_NUM_THREADS"] = str(args.threads)
    print("engine alone...", file=sys.stderr, flush=True)
    alone = engine_alone(model_dir, args, dtype, prompts, outputs)

    from batchd.embedded import EmbeddedServer
    from batchd.status import stop_processes, wait_for_workers

    with EmbeddedServer() as server:
        daemons = [
            subprocess.Popen([sys.executable, "-m", "batchd.cli", "--log-level", "WARNING", "scheduler", "--redis",
                              server.url, "--max-batch", str(args.slots), "--max-wait-ms", "5"]),
            subprocess.Popen([sys.executable, "-m", "batchd.cli", "worker", "--redis", server.url, "--engine", "hf",
                              "--model", str(model_dir), "--slots", str(args.slots), "--max-context",
                              str(args.max_context), "--device", args.device, "--dtype", dtype,
                              "--max-prefill-tokens", str(args.max_prefill_tokens),
                              *args.worker_args.split()], env=worker_env),
        ]
        try:
            wait_for_workers(server.url, timeout_s=900, processes=daemons)
            print(f"submitting {args.requests} requests through Redis...", file=sys.stderr, flush=True)
            figures = asyncio.run(submit_all(server.url, prompts, outputs, progress=True))
        finally:
            stop_processes(daemons, timeout_s=60)
    figures["engine_alone"] = alone
    figures["daemon_vs_engine"] = figures["output_tok_s"] / alone["output_tok_s"]
    figures.update(requests=args.requests, shape=shape, device=args.device, dtype=dtype, slots=args.slots,
                   threads=args.threads, load_average=os.getloadavg(),
                   expected_output_tokens=sum(outputs), device_name=_device_name(args.device))
    print(f"\n| path | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |\n|---|---|---|---|\n"
          f"| engine alone, in process | {alone['output_tok_s']:,.0f} | | |\n"
          f"| client -> Redis -> scheduler -> worker ({figures['daemon_vs_engine']:.0%} of the engine) | "
          f"{figures['output_tok_s']:,.0f} | "
          f"{figures['ttft_p50_s']:.2f} / {figures['ttft_p99_s']:.2f} | "
          f"{figures['itl_p50_s'] * 1000:.1f} / {figures['itl_p99_s'] * 1000:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))


def _device_name(device: str) -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    except Exception:
        return device


if __name__ == "__main__":
    main()
