"""Which part of the float8 product works where: eager, compiled (fixed and any shape), in a
CUDA graph; each case in its own process, since an illegal memory access poisons the CUDA
context of the process that makes it. Prints one line per case and writes JSON.

    . benchmarks/gpu_setup.sh; python3 benchmarks/fp8_probe.py --out $OUT/fp8_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

# graph_*: the product as --quantize fp8 runs it (quant.ACTIVATION_SCALES's default);
# rowwise_*: one activation scale per row; scalar_*: one scale for the weight too.
CASES = ["eager", "compiled_dynamic", "graph_fixed", "graph_dynamic", "rowwise_graph_fixed",
         "bf16_graph_fixed", "scalar_graph_fixed"]
ROWS = (8, 64, 256, 2304)


@torch.inference_mode()
def case(name: str, rows: int) -> dict:
    from batchd.workers.hf import quant
    from batchd.workers.hf.quant import Fp8Linear

    quant.ACTIVATION_SCALES = "row" if name.startswith("rowwise") else "tensor"

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", default=None)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--out", default="fp8_probe.json")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows-list", default=",".join(map(str, ROWS)))
    args = parser.parse_args()
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
