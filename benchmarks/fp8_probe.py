"""Which part of the float8 product works where: eager, compiled (fixed and any shape), in a
CUDA graph; each case in its own process, since an illegal memory access poisons the CUDA
context of the process that makes it. Prints one line per case and writes JSON.

--products instead times Llama-3-8B's four per-layer products at decode's row counts: bf16,
the float8 product through torch._scaled_mm, and the weight-only kernel (quant.FEW_ROWS_KERNEL),
each in a CUDA graph over enough copies of the weight that none is read from L2.
--configs times every configuration of the weight-only kernel (fp8_matvec.CONFIGS) on the same
products, and the zero-fill and cast around it alone, to choose the configurations it tunes over.

    . benchmarks/gpu_setup.sh; python3 benchmarks/fp8_probe.py --out $OUT/fp8_probe.json
    python3 benchmarks/fp8_probe.py --products --out $OUT/fp8_products.json
    python3 benchmarks/fp8_probe.py --configs --out $OUT/fp8_configs.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# graph_*: one activation scale per step (quant.ACTIVATION_SCALES "tensor");
# rowwise_*: one scale per row through the row-wise kernel; scalar_*: one scale for the weight too.
CASES = ["eager", "compiled_dynamic", "graph_fixed", "graph_dynamic", "rowwise_graph_fixed",
         "bf16_graph_fixed", "scalar_graph_fixed"]
ROWS = (8, 64, 256, 2304)


@torch.inference_mode()
def case(name: str, rows: int) -> dict:
    from batchd.workers.hf import quant
    from batchd.workers.hf.quant import Fp8Linear

    quant.ACTIVATION_SCALES = "row_kernel" if name.startswith("rowwise") else "tensor"

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(4096, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    full = torch.nn.Linear(4096, 6144, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(full)

    w_t, w_scale_t = layer.weight, (full.weight.abs().amax().float() / 448)

    def f(x):
        if name.startswith("bf16"):
            return full(norm(x))
        if name.startswith("scalar"):  # one scale for the weight, one for the activations
            h = norm(x).reshape(-1, 4096)
            scale = h.abs().amax().float().clamp(min=1e-12) / 448
            q = (h.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            return torch._scaled_mm(q, f.wq.t(), scale_a=scale, scale_b=w_scale_t, out_dtype=torch.bfloat16)
        return layer(norm(x))

    f.wq = (full.weight.float() / w_scale_t).clamp(-448, 448).to(torch.float8_e4m3fn)

    x = torch.randn(1, rows, 4096, device="cuda", dtype=torch.bfloat16)
    fn = f
    if "compiled" in name or "graph" in name:
        fn = torch.compile(f, dynamic="dynamic" in name)
        if "dynamic" in name:
            fn(torch.randn(1, 3, 4096, device="cuda", dtype=torch.bfloat16))  # another shape first
    out = fn(x)
    if "graph" in name:
        graph = torch.cuda.CUDAGraph()
        fn(x)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = fn(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
    torch.cuda.synchronize()
    reference = full(norm(x)).float().reshape(out.shape)
    error = ((out.float() - reference).norm() / reference.norm()).item()
    # time it: 50 calls
    started = time.perf_counter()
    for _ in range(50):
        graph.replay() if "graph" in name else fn(x)
    torch.cuda.synchronize()
    return {"case": name, "rows": rows, "relative_error": round(error, 4),
            "us_per_call": round((time.perf_counter() - started) / 50 * 1e6, 1)}


# Llama-3-8B's products per layer, (in, out): fused q/k/v, o, fused gate/up, down.
PRODUCTS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
PRODUCT_ROWS = (1, 2, 4, 8, 16)
L2_BEATING_BYTES = 200e6  # each format's copies of a weight, together: 4x an H200's L2


@torch.inference_mode()
def time_graph(call, copies: int, replays: int = 20) -> tuple[float, torch.Tensor]:
    """Microseconds per call of call(i), i over the copies, from one CUDA graph of them all."""
    for i in range(copies):  # outside the capture: Triton's tuning, cuBLAS's set-up
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call(i) for i in range(copies)]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * copies), outs[0]


@torch.inference_mode()
def products(rows_list: list[int]) -> list[dict]:
    """Each product at each row count in bf16, float8 through _scaled_mm and float8 weight-only."""
    from batchd.workers.hf import quant

    results = []
    for name, (k, n) in PRODUCTS.items():
        torch.manual_seed(0)
        copies = math.ceil(L2_BEATING_BYTES / (n * k))  # float8 bytes; bf16's copies hold twice that
        full = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        fp8 = [quant.quantize_rows(w) for w in full]
        fp8 = [(q, scale.squeeze(1).contiguous()) for q, scale in fp8]
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ full[0].float().t()
            row = {"product": name, "in": k, "out": n, "rows": rows, "copies": copies}
            for fmt in ("bf16", "scaled_mm", "weight_only"):
                if fmt == "bf16":
                    call, weight_bytes = (lambda i: F.linear(x, full[i])), 2 * n * k
                else:
                    quant.FEW_ROWS_KERNEL = fmt
                    call, weight_bytes = (lambda i: quant.fp8_linear(x, *fp8[i])), n * k + 4 * n
                try:
                    us, out = time_graph(call, copies)
                except Exception as error:  # one path failing must not lose the others' figures
                    row[fmt] = {"failed": f"{type(error).__name__}: {error}"[:300]}
                    continue
                relative = ((out.float() - reference).norm() / reference.norm()).item()
                row[fmt] = {"us": round(us, 2), "gb_s": round(weight_bytes / us / 1e3, 1),
                            "relative_error": round(relative, 4)}
            for fmt in ("scaled_mm", "weight_only"):
                if "us" in row[fmt] and "us" in row["bf16"]:
                    row[fmt]["speedup"] = round(row["bf16"]["us"] / row[fmt]["us"], 3)
            print(f"{name} {k}->{n}, {rows} rows: " + "; ".join(
                f"{fmt} {r['us']} us {r['gb_s']} GB/s {r.get('speedup', 1.0)}x err {r['relative_error']}"
                if "us" in r else f"{fmt} {r['failed']}" for fmt, r in row.items() if isinstance(r, dict)), flush=True)
            results.append(row)
    quant.FEW_ROWS_KERNEL = "scaled_mm"  # the default again
    return results


@torch.inference_mode()
def configs(rows_list: list[int]) -> list[dict]:
    """Microseconds of each weight-only configuration on each product and row count, and of
    the zero-fill and cast alone; prints the best overall and the best with SPLIT_K 1."""
    from batchd.workers.hf import fp8_matvec, quant

    results = []
    for name, (k, n) in PRODUCTS.items():
        torch.manual_seed(0)
        copies = math.ceil(L2_BEATING_BYTES / (n * k))
        fp8 = [quant.quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
               for _ in range(copies)]
        fp8 = [(q, scale.squeeze(1).contiguous()) for q, scale in fp8]
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            overhead, _ = time_graph(lambda i: torch.zeros(rows, n, dtype=torch.float32, device="cuda").to(x.dtype),
                                     copies)
            timings = []
            for config in fp8_matvec.CONFIGS:
                try:
                    us, _ = time_graph(lambda i: fp8_matvec.launch(x, *fp8[i], None, config), copies)
                except Exception as error:  # a configuration out of resources must not end the sweep
                    timings.append({"config": str(config), "failed": f"{type(error).__name__}: {error}"[:200]})
                    continue
                timings.append({"config": str(config), **config.kwargs, "warps": config.num_warps,
                                "stages": config.num_stages, "us": round(us, 2),
                                "gb_s": round((n * k + 4 * n) / us / 1e3, 1)})
            timed = [t for t in timings if "us" in t]
            picks = {"best": min(timed, key=lambda t: t["us"]),
                     "best_split1": min((t for t in timed if t["SPLIT_K"] == 1), key=lambda t: t["us"])}
            print(f"{name} {k}->{n}, {rows} rows: zero+cast {overhead:.2f} us; " + "; ".join(
                f"{label} {t['us']} us {t['gb_s']} GB/s [{t['config']}]" for label, t in picks.items()), flush=True)
            results.append({"product": name, "in": k, "out": n, "rows": rows, "zero_and_cast_us": round(overhead, 2),
                            **{label: t["config"] for label, t in picks.items()}, "timings": timings})
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", default=None)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--out", default="fp8_probe.json")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows-list", default=None, help=f"default {ROWS}, with --products {PRODUCT_ROWS}")
    parser.add_argument("--products", action="store_true", help="Llama-3-8B's per-layer products, in-process")
    parser.add_argument("--configs", action="store_true", help="every weight-only configuration on those products")
    args = parser.parse_args()
    if args.configs:
        rows = [int(r) for r in args.rows_list.split(",")] if args.rows_list else [1, 8, 16]
        with open(args.out, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "configs": configs(rows)}, out, indent=2)
        return
    if args.products:
        rows = [int(r) for r in args.rows_list.split(",")] if args.rows_list else list(PRODUCT_ROWS)
        results = products(rows)
        with open(args.out, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "products": results},
                      out, indent=2)
        return
    args.rows_list = args.rows_list or ",".join(map(str, ROWS))
    if args.one:
        print(json.dumps(case(args.one, args.rows)))
        return
    results = []
    for name in args.cases.split(","):
        for rows in map(int, args.rows_list.split(",")):
            command = [sys.executable, __file__, "--one", name, "--rows", str(rows)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            else:  # again with synchronous launches, so the error names the kernel that made it
                done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
                tail = [line for line in done.stderr.splitlines() if "Error" in line or "triton_" in line][-4:]
                row = {"case": name, "rows": rows, "failed": " / ".join(tail)[:600]}
            print(row, flush=True)
            results.append(row)
    with open(args.out, "w") as out:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, out, indent=2)


if __name__ == "__main__":
    main()
