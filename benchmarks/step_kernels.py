"""Where a decode step's GPU time goes, kernel by kernel, and whether flex decoding can read an fp8 pool.

Two phases, each written to the JSON as soon as it exists:
- kernels: for each (shape, live requests), the engine (default options, CUDA graphs on) runs
  pure decode steps; wall time per step without the profiler, then the profiler's CUDA kernel
  records over the same number of steps, summed by kernel and by kind (dense products,
  attention, fused elementwise, copies, other). What is not the weight read is what a faster
  step has to remove (issue 15: the 8B shape at 1 live request takes ~6.1 ms against ~3.8 ms of
  weights).
- fp8_flex: one layer's decode attention over a pool, through the engine's own FlexPagedDecode
  block mask, with query, keys and values in bf16 and in float8 e4m3 (values column-major, as
  flex's fp8 products need on Hopper): time per call and the largest difference from bf16.
  The question behind it is issue 19's `--kv-dtype fp8`.

    python benchmarks/step_kernels.py --out $OUT/step_kernels.json
    python benchmarks/step_kernels.py --small --device cpu --phases kernels   # script check
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from engine_gpu import Report, _free_engine_memory, _sync, build_model, workload
from serving_gpu import make_engine

log = logging.getLogger("step_kernels")


def kind_of(name: str) -> str:
    lowered = name.lower()
    # flash: the prompt pieces' varlen attention (its name also says "cutlass").
    if "flex" in lowered or "flash" in lowered or "triton_tem_fused" in lowered and "decode" in lowered:
        return "attention"
    # weight_only: --quantize fp8's Triton kernel for few rows (workers/hf/fp8_matvec.py).
    if any(word in lowered for word in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "splitk", "gemv",
                                        "weight_only")):
        return "dense products"
    if lowered.startswith("triton_"):
        return "fused elementwise (triton)"
    if any(word in lowered for word in ("copy", "index", "scatter", "gather", "memcpy", "memset", "fill")):
        return "copies and indexing"
    return "other"


def kernel_totals(profiler, on_gpu: bool) -> dict[str, list]:
    """Each kernel's [total us, calls] over a torch profiler's window: GPU kernels on a GPU,
    operators' own CPU time on a CPU (the script checks)."""
    kernels = defaultdict(lambda: [0.0, 0])
    for event in profiler.events():
        if not on_gpu:
            us = event.self_cpu_time_total
        elif event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        else:
            continue
        kernels[event.name][0] += us
        kernels[event.name][1] += 1
    return kernels


def profile_decode(engine, requests, live: int, steps: int, device: str, host_profile: bool = False,
                   admit: int = 0) -> dict:
    """admit > 0: every timed step also carries a new request's prompt of that many tokens
    (one live request is cancelled before it, freeing the row the new one takes), as the
    steps of a sustained stream of arrivals do."""
    params = SamplingParams(max_new_tokens=4 * steps + 1000, ignore_eos=True)
    names = collections.deque()
    for index, (prompt, _) in enumerate(requests[:live]):
        names.append(f"k{live}_{index}")
        engine.add(EngineRequest(names[-1], prompt, params))
    while engine.num_waiting or engine.num_prefilling:
        engine.step()
    for _ in range(5):
        engine.step()
    arrivals = itertools.count()
    prompt = requests[0][0] * (1 + admit // max(1, len(requests[0][0])))

    def step():
        if admit:
            engine.cancel(names.popleft())
            names.append(f"k{live}_new{next(arrivals)}")
            # A token of its own first, so no cached prefix shortens the piece.
            engine.add(EngineRequest(names[-1], [len(names) % 97] + prompt[:admit - 1], params))
        engine.step()

    _sync(device)
    waited = engine.device_wait_s
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    wall_ms = (time.perf_counter() - started) / steps * 1e3
    # Time the host spent waiting for the GPU's results: near zero means the host is the bottleneck.
    wait_ms = (engine.device_wait_s - waited) / steps * 1e3
    running = engine.num_running
    kernels = {}
    if device != "cpu":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            _sync(device)
        kernels = kernel_totals(prof, on_gpu=True)
    host = None
    if host_profile:
        # Where the host's time goes at this many rows: with the GPU step overlapped, a host
        # slower than the GPU is what the wall time shows.
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        _sync(device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        host = text.getvalue()
    for name in names:
        engine.cancel(name)
    while engine.has_work():
        engine.step()
    by_kind = defaultdict(float)
    table = []
    for name, (total_us, count) in sorted(kernels.items(), key=lambda item: -item[1][0]):
        by_kind[kind_of(name)] += total_us / steps
        table.append({"kernel": name[:120], "us_per_step": round(total_us / steps, 1),
                      "calls_per_step": round(count / steps, 1), "kind": kind_of(name)})
    gpu_ms = sum(by_kind.values()) / 1e3
    row = {"live": live, "admit_prompt_tokens": admit, "running": running, "wall_ms": round(wall_ms, 3), "host_waits_ms": round(wait_ms, 3), "gpu_busy_ms": round(gpu_ms, 3),
           "kernels_per_step": round(sum(r["calls_per_step"] for r in table), 1),
           "by_kind_ms": {kind: round(us / 1e3, 3) for kind, us in sorted(by_kind.items(), key=lambda i: -i[1])},
           "top_kernels": table[:25], **({"host_profile": host} if host else {})}
    log.info("live %d (%d running), admitting %d prompt tokens a step: wall %.3f ms, host waits %.3f ms, gpu busy %.3f ms, %s kernels/step, %s", live,
             running, admit, wall_ms, wait_ms, gpu_ms,
             row["kernels_per_step"], row["by_kind_ms"])
    return row


def kernels_phase(args, device: str) -> dict:
    out = {}
    for shape, lives in (("qwen3-0.6b", tuple(int(x) for x in args.qwen_live.split(","))),
                         ("llama3-8b", tuple(int(x) for x in args.llama_live.split(",")))):
        if shape not in args.shapes.split(",") or args.small and shape != "qwen3-0.6b":
            continue
        model = build_model(args.small, device, shape)
        if args.quantize == "fp8":  # as `batchd worker --quantize fp8`: every product but the head
            from batchd.workers.hf.quant import quantize_fp8_weights

            quantize_fp8_weights(model)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        started = time.perf_counter()
        engine = make_engine(model, device, slots=16 if args.small else 256, max_context=4096, kv_dtype=args.kv_dtype)
        start_s = round(time.perf_counter() - started, 1)
        vocab = model.config.vocab_size
        requests = workload(max(lives), 10 if args.small else 500, 40 if args.small else 600, vocab)  # decodes of ~550-1,600 tokens
        rows = [profile_decode(engine, requests, live, args.steps, device, host_profile=live == max(lives), admit=admit)
                for live in lives if live <= engine.total_slots for admit in args.admit]
        out[shape] = {"weight_bytes": weight_bytes, "graphs": engine.cuda_graph_sizes, "start_s": start_s, "rows": rows}
        del engine, model
        _free_engine_memory(device)
    return out


def fp8_flex_phase(device: str, rows: int = 256, context: int = 1024, block: int = 128, kv_heads: int = 8,
                   heads: int = 16, head_dim: int = 128) -> dict:
    """One layer's decode attention, bf16 against float8 e4m3 q/k/v, through the engine's block mask."""
    from batchd.workers.hf.attention import FlexPagedDecode
    from batchd.workers.hf.runner import FLEX_DECODE_OPTIONS_SM90

    blocks_per_row = context // block
    pool_blocks = rows * blocks_per_row + 8
    pool_tokens = pool_blocks * block
    table = torch.zeros(rows, blocks_per_row, dtype=torch.int32, device=device)
    logical = torch.zeros(pool_blocks, dtype=torch.int32, device=device)
    order = torch.randperm(pool_blocks - 1, device=device)[:rows * blocks_per_row] + 1
    table.copy_(order.view(rows, blocks_per_row).to(torch.int32))
    logical[order] = torch.arange(blocks_per_row, device=device, dtype=torch.int32).repeat(rows)
    lengths = torch.randint(context // 4, context, (rows,), device=device, dtype=torch.int32)
    torch.manual_seed(0)
    keys = torch.randn(1, kv_heads, pool_tokens, head_dim, device=device, dtype=torch.bfloat16)
    values = torch.randn(1, kv_heads, pool_tokens, head_dim, device=device, dtype=torch.bfloat16)
    query = torch.randn(rows, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    results = {}
    for name in ("bf16", "fp8"):
        decode = FlexPagedDecode(rows, table, logical, block, pool_tokens, heads, head_dim, scale,
                                 torch.device(device), torch.bfloat16, compile=True,
                                 kernel_options=FLEX_DECODE_OPTIONS_SM90)
        decode.prepare(SimpleNamespace(slot_lengths=lengths, row_layout=False))
        if name == "bf16":
            q, k, v = query, keys, values
        else:
            fp8 = torch.float8_e4m3fn
            q = query.to(fp8)
            k = keys.to(fp8)
            # Column-major values: flex's fp8 product softmax @ v wants them so on sm89-sm90.
            v = values.transpose(-2, -1).contiguous().to(fp8).transpose(-2, -1)
        try:
            options = {"kernel_options": dict(FLEX_DECODE_OPTIONS_SM90)}
            call = lambda: decode._flex(q, k, v, block_mask=decode._by_slot.mask, scale=scale, enable_gqa=True, **options)
            out = call()
            torch.cuda.synchronize()
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(50):
                call()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - began) / 50 * 1e3
            kv_bytes = 2 * int(lengths.sum()) * kv_heads * head_dim * (1 if name == "fp8" else 2)
            results[name] = {"ms": round(ms, 4), "gb_s": round(kv_bytes / ms / 1e6, 1), "out": out.float()}
        except Exception as error:  # the answer to the question is "no" and why
            log.exception("flex decode in %s failed", name)
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
    reference = results["bf16"].pop("out", None)
    candidate = results["fp8"].pop("out", None)
    if reference is not None and candidate is not None:
        results["fp8"]["max_abs_diff"] = round(float((candidate - reference).abs().max()), 4)
        results["fp8"]["mean_abs_diff"] = round(float((candidate - reference).abs().mean()), 5)
        results["fp8"]["speedup"] = round(results["bf16"]["ms"] / results["fp8"]["ms"], 3)
    results["shape"] = {"rows": rows, "context": context, "kv_heads": kv_heads, "heads": heads, "head_dim": head_dim}
    log.info("fp8 flex: %s", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--phases", default="fp8_flex,kernels")
    parser.add_argument("--shapes", default="qwen3-0.6b,llama3-8b")
    parser.add_argument("--qwen-live", default="8,64,256")
    parser.add_argument("--kv-dtype", default="auto", choices=("auto", "fp8"))
    parser.add_argument("--quantize", default="none", choices=("none", "fp8"), help="the weights' format")
    parser.add_argument("--few-rows-kernel", default=None, choices=("scaled_mm", "weight_only"),
                        help="with --quantize fp8: quant.FEW_ROWS_KERNEL, the path of products of 1-16 rows "
                             "(default: the worker's)")
    parser.add_argument("--activation-scales", default=None, choices=("tensor", "row", "row_kernel"),
                        help="with --quantize fp8: quant.ACTIVATION_SCALES (default: the worker's)")
    parser.add_argument("--llama-live", default="1,8,64")
    parser.add_argument("--admit", default="0", type=lambda text: [int(x) for x in text.split(",")],
                        help="prompt tokens each profiled step also carries (a new request a step); 0: pure decode")
    parser.add_argument("--out", default="benchmarks/results/step_kernels.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quantize == "fp8":  # unset, both stay as `batchd worker --quantize fp8` runs them
        from batchd.workers.hf import quant

        quant.FEW_ROWS_KERNEL = args.few_rows_kernel = args.few_rows_kernel or quant.FEW_ROWS_KERNEL
        quant.ACTIVATION_SCALES = args.activation_scales = args.activation_scales or quant.ACTIVATION_SCALES
    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "quantize": args.quantize, "few_rows_kernel": args.few_rows_kernel if args.quantize == "fp8" else None,
            "activation_scales": args.activation_scales if args.quantize == "fp8" else None,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = Report(args.out, meta)
    report.data["benchmark"] = "step_kernels"
    for phase in args.phases.split(","):
        if phase == "fp8_flex" and args.device != "cpu":
            report.phase("fp8_flex", lambda: fp8_flex_phase(args.device))
        if phase == "kernels":
            report.phase("kernels", lambda: kernels_phase(args, args.device))


if __name__ == "__main__":
    main()
