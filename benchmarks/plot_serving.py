"""Plot TTFT and ITL (p50, p99) against the Poisson arrival rate, for docs/performance.md.

    .venv/bin/python benchmarks/plot_serving.py \
        --result "budget following the backlog (512, burst 2,048)=benchmarks/results/serving_gpu_h200_burst.json" \
        --result "fixed budget 512=benchmarks/results/serving_gpu_h200.json" \
        --result "fixed budget 2,048=benchmarks/results/serving_gpu_h200_budget2048.json" \
        --out docs/serving-poisson.png

Each JSON is serving_gpu.py's, with a poisson phase.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", action="append", required=True, help="LABEL=path to a serving_gpu.py JSON")
    parser.add_argument("--out", type=Path, default=Path("docs/serving-poisson.png"))
    args = parser.parse_args()
    figure, (ttft, itl) = plt.subplots(1, 2, figsize=(10.4, 3.8))
    styles = ["-", "--", ":"]
    for (label, path), style in zip((item.split("=", 1) for item in args.result), styles):
        data = json.loads(Path(path).read_text())
        rates = data["phases"]["poisson"]["rates"]
        x = [r["rate_per_s"] for r in rates]
        for axis, name in ((ttft, "ttft_ms"), (itl, "itl_ms")):
            axis.plot(x, [r[f"{name}_p50"] for r in rates], "o" + style, color="#1f77b4", label=f"{label}, p50")
            axis.plot(x, [r[f"{name}_p99"] for r in rates], "s" + style, color="#d62728", label=f"{label}, p99")
    ttft.set(title="time to first token", xlabel="arrivals per second", ylabel="ms", yscale="log")
    itl.set(title="inter-token latency", xlabel="arrivals per second", ylabel="ms", yscale="log")
    ttft.axhline(250, color="#999999", linewidth=0.8)
    ttft.annotate("TTFT p99 bar at 20/s (250 ms)", (x[0], 260), fontsize=7, color="#666666")
    for axis in (ttft, itl):
        axis.grid(alpha=0.3)
    itl.legend(fontsize=7)
    figure.suptitle(f"{data['device']}, Qwen3-0.6B shape, prompt and output U[100, 1024], 300 requests a rate",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
