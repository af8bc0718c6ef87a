"""Plot a decode step's time by live requests, with the smallest decode CUDA graph that holds
them against the graph over every slot, for docs/engine.md and docs/performance.md.

    .venv/bin/python benchmarks/plot_graph_sizes.py \
        --result "Qwen3-0.6B shape=benchmarks/results/engine_gpu.json" \
        --result "Llama-3-8B shape=benchmarks/results/step_by_live_llama3_8b_h200.json" \
        --out docs/decode-graph-sizes.png

Each JSON is engine_gpu.py's, with a step_by_live_compiled phase.
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
    parser.add_argument("--result", action="append", required=True, help="LABEL=path to an engine_gpu.py JSON")
    parser.add_argument("--out", type=Path, default=Path("docs/decode-graph-sizes.png"))
    args = parser.parse_args()
    results = [item.split("=", 1) for item in args.result]
    figure, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8))
    for ax, (label, path) in zip(axes if len(results) > 1 else [axes], results):
        data = json.loads(Path(path).read_text())
        table = data["phases"]["step_by_live_compiled"]["table"]
        live = [row["live"] for row in table]
        ax.plot(live, [row["all_slots_graph_ms"] for row in table], "s--", color="#999999",
                label="graph over all 256 slots")
        ax.plot(live, [row["smallest_graph_ms"] for row in table], "o-", label="smallest graph that holds them")
        for row in table:
            saved = round(100 * (1 - row["smallest_graph_ms"] / row["all_slots_graph_ms"]))
            ax.annotate(f"{saved:+d}%" if saved else "0%", (row["live"], row["all_slots_graph_ms"]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(live, [str(n) for n in live])
        ax.set_xlabel("requests decoding in the step")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"{label}, bf16, {data['device']}", fontsize=9)
        ax.legend(fontsize=8)
    figure.suptitle("A decode step's time; labels: time the smaller CUDA graph saves", fontsize=10)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
