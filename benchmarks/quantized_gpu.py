"""Does --quantize make decoding faster? Decode tok/s by live requests, each weight format.

For each format the same random-weight model (Llama-3-8B shape by default) is built,
quantized, and served by the hf engine with its compiled, graph-captured decode step;
then, for each number of live requests, that many requests of the anchor workload's
prompts are admitted, their prompts computed, and a run of pure decode steps timed.
Formats (the first is the reference the ratios divide by):

    bf16         the model's own dtype
    fp8          --quantize fp8 as it ships: float8 weights with per-channel scales, one
                 product per fused projection (workers/hf/quant.py), activations scaled
                 per row (batch-invariant; the maximum found in the kernel that makes the
                 row), through cuBLASLt's tensor-wise kernel with the scales applied after
    fp8_tensor   the same with one activation scale per step (quant.ACTIVATION_SCALES =
                 "tensor")
    fp8_row_kernel one scale per row through cuBLASLt's row-wise kernel
    fp8_weight_only steps of 1-16 rows through the weight-only Triton kernel (fp8_matvec.py,
                 quant.FEW_ROWS_KERNEL = "weight_only"), activations unquantized
    fp8_torchao  the same scheme through torchao's Float8DynamicActivationFloat8WeightConfig
                 (per-row), whose tensors the runner cannot fuse: the alternative
                 quant.py was chosen over
    int8         --quantize int8 (torchao weight-only)

    . benchmarks/gpu_setup.sh; python3 benchmarks/quantized_gpu.py --out $OUT/quantized_gpu.json
    python benchmarks/quantized_gpu.py --device cpu --small --live 1,4 --formats bf16,fp8   # check the script

Prints a table and writes JSON. Quality (greedy agreement, log-prob difference on real
text) is benchmarks/weights.py's job: random weights say nothing about it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
import traceback
from pathlib import Path

import torch
from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf.models import quantize_int8_weights, weight_bytes
from batchd.workers.hf import quant
from batchd.workers.hf.quant import quantize_fp8_weights
from engine_gpu import build_model, make_engine, workload  # benchmarks/ is on sys.path as a script

log = logging.getLogger("quantized_gpu")
FORMATS = ("bf16", "fp8", "fp8_tensor", "fp8_row_kernel", "fp8_weight_only", "int8", "fp8_torchao")


def quantize(model, name: str) -> None:
    # Module switches, read when the decode step is traced: set for every format, so none
    # inherits the last one's.
    quant.ACTIVATION_SCALES = {"fp8_tensor": "tensor", "fp8_row_kernel": "row_kernel"}.get(name, "row")
    quant.FEW_ROWS_KERNEL = "weight_only" if name == "fp8_weight_only" else "scaled_mm"
    if name in ("fp8", "fp8_tensor", "fp8_row_kernel", "fp8_weight_only"):
        quantize_fp8_weights(model)
    elif name == "int8":
        quantize_int8_weights(model)
    elif name == "fp8_torchao":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        head = model.get_output_embeddings()
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear) and module is not head)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(engine, requests, live: int, steps: int, device: str) -> dict:
    """tok/s and ms per step of `steps` pure decode steps with `live` requests running."""
    for index, (prompt, _) in enumerate(requests[:live]):
        engine.add(EngineRequest(f"live{live}_{index}", prompt,
                                 SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)))
    while engine.num_waiting or engine.num_prefilling:
        engine.step()
    for _ in range(3):
        engine.step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    seconds = time.perf_counter() - started
    while engine.has_work():  # let them finish, freeing their blocks for the next count
        engine.step()
    return {"live": live, "step_ms": round(seconds / steps * 1e3, 3), "tok_s": round(live * steps / seconds, 1)}


def apply_variant(variant: str) -> None:
    """Ways to narrow down a failure: steps with prompt pieces outside CUDA graphs, or the
    float8 product's rows padded to a multiple of 16."""
    if variant == "no_mixed_graphs":
        import batchd.workers.hf.engine as engine_module

        engine_module.mixed_graph_sizes = lambda *sizes: []
    elif variant == "padded_rows":
        from batchd.workers.hf import quant

        plain = quant.fp8_linear

        def padded(x, weight, weight_scale, bias=None):
            rows = x.reshape(-1, x.shape[-1])
            extra = -rows.shape[0] % 16
            out = plain(torch.nn.functional.pad(rows, (0, 0, 0, extra)), weight, weight_scale, bias)
            return out[:rows.shape[0]].reshape(*x.shape[:-1], weight.shape[0])

        quant.fp8_linear = padded


def measure(args, name: str, requests) -> dict:
    model = build_model(args.small, args.device, args.shape)
    quantize(model, name)
    started = time.monotonic()
    engine = make_engine(model, slots=args.slots, max_context=args.max_context, device=args.device,
                         compile_decode=args.device != "cpu" and args.variant != "uncompiled")
    row = {"format": name, "variant": args.variant, "weight_gib": round(weight_bytes(model) / 2**30, 3),
           "engine_start_s": round(time.monotonic() - started, 1), "rates": []}
    for live in args.live:
        rate = decode_rate(engine, requests, live, args.steps, args.device)
        log.info("%s: %s", name, rate)
        row["rates"].append(rate)
    del engine, model
    gc.collect()
    torch._dynamo.reset()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("qwen3-0.6b", "llama3-8b"), default="llama3-8b")
    parser.add_argument("--small", action="store_true", help="a tiny model, to check the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, reference first")
    parser.add_argument("--live", default="1,2,4,8,64,256", help="numbers of live requests")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--variant", choices=("default", "no_mixed_graphs", "uncompiled", "padded_rows"),
                        default="default", help="narrow down a failure (see apply_variant)")
    parser.add_argument("--out", default="benchmarks/results/quantized_gpu.json")
    args = parser.parse_args()
    apply_variant(args.variant)
    args.live = [int(n) for n in args.live.split(",")]
    args.live = [n for n in args.live if n <= args.slots]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    low, high = (10, 40) if args.small else (100, 1024)
    requests = workload(max(args.live), low, high, 1000)
    rows = []
    for name in args.formats.split(","):
        log.info("%s: building, quantizing and starting the engine...", name)
        try:
            rows.append(measure(args, name, requests))
        except Exception as error:  # one format failing must not lose the others' figures
            traceback.print_exc()
            rows.append({"format": name, "error": f"{type(error).__name__}: {error}"[:500]})
        write(args, rows)  # after each format: a run cut short keeps what it measured
    print_table(args, rows)
    print(f"wrote {args.out}")


def write(args, rows: list[dict]) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"shape": "tiny Qwen3 (script check)" if args.small else args.shape, "device": device,
              "torch": torch.__version__, "time": time.time(), "steps": args.steps, "slots": args.slots, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


def print_table(args, rows: list[dict]) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{'tiny Qwen3' if args.small else args.shape} random weights on {device}, torch {torch.__version__}; "
          f"decode tok/s ({args.steps} steps) by live requests, ratio to {rows[0]['format']}")
    print("| format | weight GiB | " + " | ".join(f"{n} live" for n in args.live) + " |")
    print("|---|---:|" + "---:|" * len(args.live))
    reference = {r["live"]: r["tok_s"] for r in rows[0].get("rates", [])}
    for row in rows:
        if "error" in row:
            print(f"| {row['format']} | failed: {row['error'][:80]} |")
            continue
        cells = [f"{r['tok_s']:.0f} ({r['tok_s'] / reference[r['live']]:.2f}x)" if r["live"] in reference
                 else f"{r['tok_s']:.0f}" for r in row["rates"]]
        print(f"| {row['format']} | {row['weight_gib']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
