"""Decode attention over the slot cache: one query token per decoding slot.

Two ways, same result:
- `SdpaDecode` slices the cache to the longest live length and masks the rest.
  Simple and fast enough on CPU, but on a GPU it reads every slot's cache up to
  the longest one, padding included.
- `FlexDecode` runs flex_attention over every slot with a block mask built from
  each slot's own length, so it reads only live 128-token blocks. Its shapes
  never change (all slots, the whole cache), which lets CUDA graphs capture it
  for any number of decoding rows; the mask is updated in place from the
  lengths, inside the graph.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

KV_BLOCK = 128


class SdpaDecode:
    def __init__(self, heads: int, kv_heads: int, head_dim: int, scale: float):
        self._heads, self._kv_heads, self._head_dim, self._scale = heads, kv_heads, head_dim, scale

    def prepare(self, batch) -> None:
        """Nothing to precompute: the batch carries the mask."""

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch) -> torch.Tensor:
        length = batch.decode_max_len
        if batch.decode_slot_range is not None:
            first, last = batch.decode_slot_range
            k, v = keys[first:last, :, :length], values[first:last, :, :length]
        else:
            k = keys[batch.decode_slots, :, :length]
            v = values[batch.decode_slots, :, :length]
        # Grouped query heads become the query-length axis: one query per head, no
        # repeated keys, and an ordinary key-padding mask.
        group = self._heads // self._kv_heads
        q = q.reshape(-1, self._kv_heads, group, self._head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.decode_mask, scale=self._scale)
        return out.reshape(-1, self._heads, self._head_dim)


class FlexDecode:
    def __init__(self, slots: int, context: int, heads: int, head_dim: int, scale: float,
                 device: torch.device, dtype: torch.dtype, compile: bool, kernel_options: dict | None = None):
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        if context % KV_BLOCK:
            raise ValueError(f"the cache length must be a multiple of {KV_BLOCK} for flex attention")
        self._slots, self._heads, self._head_dim, self._scale = slots, heads, head_dim, scale
        blocks = context // KV_BLOCK
        as_int = {"dtype": torch.int32, "device": device}
        # Tokens each slot attends to this step; 0 for slots not decoding.
        self.lengths = torch.zeros(slots, **as_int)
        self._partial_count = torch.zeros(slots, 1, 1, **as_int)
        self._partial_index = torch.zeros(slots, 1, 1, blocks, **as_int)
        self._full_count = torch.zeros(slots, 1, 1, **as_int)
        full_index = torch.arange(blocks, **as_int).expand(slots, 1, 1, blocks).contiguous()
        lengths = self.lengths

        def live(batch, head, query, key):
            return key < lengths[batch]

        extra = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {}
        # Full blocks skip the mask function; only each slot's last, partial block evaluates it.
        self._mask = BlockMask.from_kv_blocks(self._partial_count, self._partial_index, self._full_count, full_index,
                                              BLOCK_SIZE=(KV_BLOCK, KV_BLOCK), mask_mod=live,
                                              seq_lengths=(1, context), **extra)
        self._flex = torch.compile(flex_attention, dynamic=False, fullgraph=True) if compile else flex_attention
        self._query = torch.zeros(slots, heads, 1, head_dim, device=device, dtype=dtype)
        self._kernel_options = dict(kernel_options) if kernel_options else None

    def prepare(self, batch) -> None:
        """Point the block mask at this step's lengths (in place, so a CUDA graph sees it).
        A CUDA graph's batch carries none: its lengths were copied in before the replay."""
        if batch.slot_lengths is not None:
            self.lengths.copy_(batch.slot_lengths)
        full = self.lengths // KV_BLOCK
        self._full_count.view(-1).copy_(full)
        self._partial_count.view(-1).copy_((self.lengths % KV_BLOCK != 0).to(torch.int32))
        self._partial_index[:, 0, 0, 0].copy_(full)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch) -> torch.Tensor:
        if batch.decode_all_slots:
            query = q[:, :, None]
        else:
            # Rows go to their slots' places: the block mask is laid out by slot.
            query = self._query.zero_()
            query[batch.decode_slots] = q[:, :, None]
        extra = {"kernel_options": self._kernel_options} if self._kernel_options else {}
        out = self._flex(query, keys, values, block_mask=self._mask, scale=self._scale, enable_gqa=True, **extra)
        out = out[:, :, 0]
        return out if batch.decode_all_slots else out[batch.decode_slots]
