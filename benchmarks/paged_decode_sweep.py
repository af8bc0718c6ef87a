"""Decode attention over the paged pool, by layout and block-mask form, against the copy bandwidth.

One layer of the Qwen3-0.6B shape (16 heads, 8 KV heads, head_dim 128, bf16); 256 rows whose
lengths are drawn from the anchor workload's middle (prompt U[100, 1024] plus half of an
output U[100, 1024]); each row's blocks scattered at random over the pool, as a busy pool
leaves them. Each variant is compiled once and timed over 50 calls (CUDA events); the bytes
it must read are every live key and value once. Also the same rows in one contiguous cache
per row, as the per-slot cache held them: what paging costs.

    python benchmarks/paged_decode_sweep.py --out $OUT/paged_decode_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from batchd.workers.hf.attention import FlexPagedDecode
from batchd.workers.hf.kv_cache import KVPool

BLOCK, HEADS, KV_HEADS, DIM = 128, 16, 8, 128


class _Batch:
    decode_all_slots = True
    row_layout = False

    def __init__(self, lengths, rows):
        self.slot_lengths, self.decode_slots = lengths, rows


def _time(call, repeats: int = 50) -> float:
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def contiguous(q, lengths, context: int, scale: float, options: dict) -> float:
    """The per-slot cache's kernel: every row its own [kv_heads, context, dim], full blocks."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    rows = q.shape[0]
    keys = torch.randn(rows, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    blocks = context // BLOCK
    full = (lengths // BLOCK).view(rows, 1, 1)
    partial = (lengths % BLOCK != 0).to(torch.int32).view(rows, 1, 1)
    index = torch.arange(blocks, device="cuda", dtype=torch.int32).expand(rows, 1, 1, blocks).contiguous()
    partial_index = torch.zeros(rows, 1, 1, blocks, device="cuda", dtype=torch.int32)
    partial_index[:, 0, 0, 0] = full.view(-1)

    def live(b, h, q_idx, k_idx):
        return k_idx < lengths[b]

    mask = BlockMask.from_kv_blocks(partial, partial_index, full, index, BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=live,
                                    seq_lengths=(1, context), compute_q_blocks=False)
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _time(lambda: flex(q[:, :, None], keys, values, block_mask=mask, scale=scale, enable_gqa=True,
                              kernel_options=options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/paged_decode_sweep.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = args.rows
    lengths_list = rng.integers(100, 1025, rows) + rng.integers(100, 1025, rows) // 2
    context = 2048
    num_blocks = rows * context // BLOCK + 1
    lengths = torch.tensor(lengths_list, device="cuda", dtype=torch.int32)
    table = torch.zeros(rows, context // BLOCK, device="cuda", dtype=torch.int32)
    logical = torch.zeros(num_blocks, device="cuda", dtype=torch.int32)
    order = rng.permutation(np.arange(1, num_blocks))
    at = 0
    for row, length in enumerate(lengths_list):
        count = -(-int(length) // BLOCK)
        blocks = order[at:at + count]
        at += count
        table[row, :count] = torch.tensor(blocks, device="cuda", dtype=torch.int32)
        logical[torch.tensor(blocks, device="cuda")] = torch.arange(count, device="cuda", dtype=torch.int32)
    live_bytes = int(lengths.sum()) * KV_HEADS * DIM * 2 * 2
    source = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    target = torch.empty_like(source)
    copy_ms = _time(lambda: target.copy_(source), 20)
    bandwidth = 2 * source.numel() / copy_ms / 1e6  # GB/s, read plus write
    del source, target
    q = torch.randn(rows, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    scale = DIM ** -0.5
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
               "live_tokens": int(lengths.sum()), "copy_bandwidth_gb_s": round(bandwidth, 1), "variants": []}
    variants = [(layout, full, split) for layout in ("head", "token") for full, split in
                ((False, 1), (False, 2), (False, 4), (True, 1), (True, 2))]
    for layout, full, split in variants:
        started = time.perf_counter()
        try:
            pool = KVPool(1, num_blocks, BLOCK, KV_HEADS, DIM, torch.bfloat16, torch.device("cuda"), layout)
            pool.keys.normal_()
            pool.values.normal_()
            options = {"num_stages": 3, "SPLIT_KV": split}
            attention = FlexPagedDecode(rows, table, logical, BLOCK, num_blocks * BLOCK, HEADS, DIM, scale,
                                        torch.device("cuda"), torch.bfloat16, compile=True, kernel_options=options,
                                        full_blocks=full)
            batch = _Batch(lengths, torch.arange(rows, device="cuda"))
            attention.prepare(batch)
            ms = _time(lambda: attention.decode(q, pool, 0, batch))
            row = {"layout": layout, "full_blocks": full, "split_kv": split, "ms": round(ms, 4),
                   "read_gb_s": round(live_bytes / ms / 1e6, 1), "of_copy": round(live_bytes / ms / 1e6 / bandwidth, 3)}
            del pool, attention
        except Exception as exc:  # noqa: BLE001 - a variant the kernel rejects is a result too
            row = {"layout": layout, "full_blocks": full, "split_kv": split, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        results["variants"].append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    try:
        ms = contiguous(q, lengths, context, scale, {"num_stages": 3, "SPLIT_KV": 2})
        results["contiguous_per_slot"] = {"ms": round(ms, 4), "read_gb_s": round(live_bytes / ms / 1e6, 1),
                                          "of_copy": round(live_bytes / ms / 1e6 / bandwidth, 3)}
    except Exception as exc:  # noqa: BLE001
        results["contiguous_per_slot"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(results["contiguous_per_slot"])
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
