"""Plot the engine benchmarks for docs/performance.md from their JSON results.

    .venv/bin/python benchmarks/plot_engine.py [--gpu benchmarks/results/engine_gpu.json]
        [--cpu benchmarks/results/engine_cpu.json] [--out docs/engine_benchmarks.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GPU_ROWS = [
    ("HF generate,\none at a time", "hf_sequential"),
    ("HF generate,\nstatic batches of 16", "hf_static"),
    ("transformers CB,\ntuned", "transformers_cb"),
    ("batchd engine,\ndecode not compiled", "engine"),
    ("batchd engine, lockstep\n(no step in flight)", "engine_compiled_lockstep"),
    ("batchd engine (default)", "engine_compiled"),
    ("batchd engine, one decode\ngraph (all slots)", "engine_one_graph_compiled"),
    ("HBM roofline", "roofline"),
]


def plot_gpu(ax, data: dict) -> None:
    rows = [(_label(label, key, data), data["phases"][key]["tok_s"]) for label, key in GPU_ROWS
            if "tok_s" in data["phases"].get(key, {})]
    labels, values = zip(*rows)
    colors = ["#999999" if "batchd" not in label and "roofline" not in label else "#1f77b4" for label in labels]
    colors = ["#dddddd" if "roofline" in label else c for label, c in zip(labels, colors)]
    bars = ax.barh(labels, values, color=colors)
    ax.set_xscale("log")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel("output tokens/s (log scale)")
    ax.set_title(f"{data['device']}: {data['requests']} requests, Qwen3-0.6B shape, bf16", fontsize=9)
    ax.invert_yaxis()


def _label(label: str, key: str, data: dict) -> str:
    # A run made before the engine chose its decode graphs at start replayed every size;
    # say so rather than call it the default.
    if key == "engine_compiled" and "engine_compiled_cuda_graph_sizes" not in data:
        return "batchd engine, every decode\ngraph size (8-256)"
    return label


def plot_cpu(ax, data: dict) -> None:
    rows = data["rows"]
    concurrency = [r["concurrency"] for r in rows]
    ax.plot(concurrency, [r["engine_tok_s"] for r in rows], "o-", label="batchd engine")
    ax.plot(concurrency, [r["hf_generate_tok_s"] for r in rows], "s--", color="#999999",
            label="HF generate, one at a time")
    for r in rows:
        ax.annotate(f"{r['speedup']}x", (r["concurrency"], r["engine_tok_s"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{data['model']} on this {data['machine']['cores']}-core CPU, float32", fontsize=9)
    ax.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="benchmarks/results/engine_gpu.json")
    parser.add_argument("--cpu", default="benchmarks/results/engine_cpu.json")
    parser.add_argument("--out", default="docs/engine_benchmarks.png")
    args = parser.parse_args()
    figure, (gpu_ax, cpu_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    plot_gpu(gpu_ax, json.loads(Path(args.gpu).read_text()))
    plot_cpu(cpu_ax, json.loads(Path(args.cpu).read_text()))
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
