"""Flex decode kernel settings for the anchor workload's decode step, timed on the GPU.

One layer's decode attention as the engine runs it (FlexDecode: every slot, a
block mask from each slot's length, grouped query heads), Qwen3-0.6B head shape,
256 slots with lengths uniform in [200, 2048], bf16. Each setting of the kernel
(BLOCK_N, num_stages, num_warps, SPLIT_KV) is compiled and timed with CUDA
events; the table gives ms per layer and the live KV read rate, against a
device-to-device copy of the same bytes.

    python benchmarks/flex_decode_sweep.py --out $OUT/flex_sweep.json

It measures the per-slot engine's FlexDecode, which the paged cache replaced at 7cedcc8: it
runs on a checkout of 7cedcc8^ (the figures in docs/performance.md that cite it were made
so). For today's paged decode attention use benchmarks/paged_decode_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from batchd.workers.hf.attention import FlexDecode
from batchd.workers.hf.runner import cache_length

SETTINGS = [
    {},  # torch's default for this GPU
    {"num_stages": 2},
    {"num_stages": 3},
    {"num_stages": 4},
    {"num_warps": 4},
    {"num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "num_stages": 4},
    {"SPLIT_KV": 2, "num_stages": 3},
    {"SPLIT_KV": 4, "num_stages": 3},
]


class _AllSlots:
    decode_all_slots = True
    slot_lengths = None  # FlexDecode reads its own lengths, as inside a decode graph


def time_setting(options: dict, lengths: torch.Tensor, slots: int, context: int, repeats: int) -> float:
    heads, kv_heads, head_dim = 16, 8, 128
    attention = FlexDecode(slots, context, heads, head_dim, head_dim ** -0.5, torch.device("cuda"), torch.bfloat16,
                           compile=True, kernel_options=options or None)
    attention.lengths.copy_(lengths)
    batch = _AllSlots()
    attention.prepare(batch)
    keys = torch.randn(slots, kv_heads, context, head_dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    query = torch.randn(slots, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        attention(query, keys, values, batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        attention(query, keys, values, batch)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_ms(nbytes: int, repeats: int = 20) -> float:
    source = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/flex_sweep.json")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    context = cache_length(2048, "flex")
    lengths = torch.randint(200, 2049, (args.slots,), generator=torch.Generator().manual_seed(0)).to(
        "cuda", torch.int32)
    live_bytes = int(lengths.sum()) * 8 * 128 * 2 * 2  # keys and values, 8 KV heads of 128, bf16
    # A copy of N bytes moves 2N (read and write); attention reads the live bytes once, so its
    # ceiling is a copy of half of them.
    ceiling_ms = copy_ms(live_bytes // 2)
    rows = []
    for options in SETTINGS:
        started = time.perf_counter()
        try:
            ms = time_setting(options, lengths, args.slots, context, args.repeats)
            row = {"options": options, "ms_per_layer": round(ms, 4), "gb_s": round(live_bytes / ms / 1e6, 1),
                   "of_copy": round(ceiling_ms / ms, 3)}
        except Exception as exc:  # noqa: BLE001 - a setting the compiler refuses is a row, not the end
            row = {"options": options, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        row["compile_and_time_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(row, flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "slots": args.slots,
              "live_kv_bytes": live_bytes, "copy_ceiling_ms": round(ceiling_ms, 4), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}: one layer's decode attention, {args.slots} slots, "
          f"{live_bytes / 1e9:.2f} GB of live KV; copy ceiling {ceiling_ms:.3f} ms")
    print("| settings | ms per layer | GB/s | of copy bandwidth |\n|---|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['options'] or 'default'} | - | - | {row['error'][:60]} |")
        else:
            print(f"| {row['options'] or 'default'} | {row['ms_per_layer']:.3f} | {row['gb_s']:,.0f} | "
                  f"{row['of_copy']:.0%} |")


if __name__ == "__main__":
    main()
