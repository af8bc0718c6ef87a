"""The paged KV cache's tensors: every layer's keys and values in one pool of fixed-size blocks.

Allocated once, at start. Position p of a request lives at physical position
`block_table[p // block_size] * block_size + p % block_size` of the flat token
axis; workers/hf/blocks.py decides which blocks a request holds. Token-major
([layers, tokens, kv_heads, head_dim]), as vLLM and FlashAttention keep theirs:
a write or a gather moves whole rows of kv_heads x head_dim, and attention
kernels take a strided [1, kv_heads, tokens, head_dim] view of it.
"""

from __future__ import annotations

from typing import Any

import torch

# Tokens a block holds on a GPU: flex attention's sparse block, so a block table is its KV
# block index. On a CPU smaller blocks waste less of a short request's last block.
GPU_BLOCK_SIZE = 128
CPU_BLOCK_SIZE = 16


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """layout "head": [layers, kv_heads, tokens, head_dim], a block of one head contiguous
    (32 KiB at 128 x 128 bf16), which attention kernels stream best; "token":
    [layers, tokens, kv_heads, head_dim], a position's heads contiguous, as vLLM keeps it.
    Which reads faster is measured (benchmarks/paged_decode_sweep.py, docs/performance.md)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, layout: str = "head"):
        if layout not in ("head", "token"):
            raise ValueError(f"KV layout {layout!r} is not one of head, token")
        self.num_blocks, self.block_size, self.layout = num_blocks, block_size, layout
        tokens = num_blocks * block_size
        shape = (layers, kv_heads, tokens, head_dim) if layout == "head" else (layers, tokens, kv_heads, head_dim)
        # Zeroed, not empty: positions no request owns still enter a padded attention product
        # (masked), and NaNs there would poison it.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.bytes = 2 * self.keys.numel() * self.keys.element_size()
        self._token_axis = 1 if layout == "head" else 0  # within one layer

    def write(self, layer: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a step's new keys and values ([tokens, kv_heads, head_dim]) at physical positions."""
        if self.layout == "head":
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)
        self.keys[layer].index_copy_(self._token_axis, index, keys)
        self.values[layer].index_copy_(self._token_axis, index, values)

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at physical positions, [*index.shape, kv_heads, head_dim]."""
        if self.layout == "token":
            return self.keys[layer][index], self.values[layer][index]
        keys, values = self.keys[layer][:, index], self.values[layer][:, index]  # [kv_heads, *index.shape, head_dim]
        return keys.movedim(0, -2), values.movedim(0, -2)

    def heads_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool of one layer as one long sequence, [1, kv_heads, tokens, head_dim]."""
        if self.layout == "head":
            return self.keys[layer][None], self.values[layer][None]
        return self.keys[layer].permute(1, 0, 2)[None], self.values[layer].permute(1, 0, 2)[None]

    def copy(self, copies: list[tuple[int, int, int]]) -> None:
        """Positions [0, length) of each (source, target, length) block into the other, every
        layer at once: one gather and one scatter for all of a step's copies."""
        size = self.block_size
        source = [s * size + p for s, _, n in copies for p in range(n)]
        target = [t * size + p for _, t, n in copies for p in range(n)]
        if not source:
            return
        staged = to_device([*source, *target], torch.long, self.keys.device)
        source_index, target_index = staged[:len(source)], staged[len(source):]
        axis = self._token_axis + 1
        for pool in (self.keys, self.values):
            pool.index_copy_(axis, target_index, pool.index_select(axis, source_index))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the GPU.

    A plain copy from pageable memory synchronises the stream, which would stall the
    host until the step already running ends; a pinned, non-blocking copy just queues.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
