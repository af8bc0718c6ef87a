"""Attention over the paged KV cache, for every kind of row a step carries.

A step's tokens come in two kinds (workers/hf/runner.py orders them so):
- one-token rows: decodes, and one-token prompt pieces (a scoring call that
  extends a cached prefix by one token is exactly a decode);
- prompt pieces of several tokens: fresh prompts, prompts continuing a cached
  or shared prefix, scoring continuations.
Both read keys and values through the requests' block tables; the step's new
keys are written into the pool before either reads.

- `PagedSdpa`: gathers each row's keys into place and runs SDPA. Exact; the
  CPU's path for both kinds, and the reference the GPU paths are checked against.
- `FlexPagedDecode`: one-token rows on a GPU. flex_attention over the whole
  pool seen as one sequence, with a block mask whose KV block indices are the
  block tables themselves (the pool's block is flex's sparse block): full
  blocks skip the mask function, each row's last, partial block evaluates it.
  Its shapes never change, so the mask is rebuilt in place from the rows'
  lengths inside a CUDA graph.
- `VarlenPrefill`: prompt pieces on a GPU in bf16/fp16: each piece's keys
  (its cached prefix and its own) gathered from the pool, then one
  variable-length flash attention call for all of a step's pieces, causal
  aligned to each piece's end.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

from .kv_cache import to_fp8

log = logging.getLogger("batchd.engine.hf")


class PagedSdpa:
    def __init__(self, heads: int, kv_heads: int, head_dim: int, scale: float):
        self._heads, self._kv_heads, self._head_dim, self._scale = heads, kv_heads, head_dim, scale

    def prepare(self, batch) -> None:
        """Nothing to precompute: the batch carries each row's positions."""

    def decode(self, q: torch.Tensor, pool, layer: int, batch) -> torch.Tensor:
        """q [rows, heads, head_dim]: each row attends to its request's first `length` positions."""
        keys, values = pool.gather(layer, batch.decode_gather)  # [rows, longest, kv_heads, head_dim]
        # Grouped query heads become the query-length axis: one query per head, no
        # repeated keys, and an ordinary key-padding mask.
        group = self._heads // self._kv_heads
        q = q.reshape(-1, self._kv_heads, group, self._head_dim)
        out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=batch.decode_mask, scale=self._scale)
        return out.reshape(-1, self._heads, self._head_dim)

    def prefill(self, q: torch.Tensor, pool, layer: int, batch) -> torch.Tensor:
        """q [piece tokens, heads, head_dim], pieces one after another: each attends causally to
        its request's positions up to its own."""
        keys, values = pool.gather(layer, batch.piece_gather)  # [sum of key lengths, kv_heads, head_dim]
        out = []
        for (q_begin, q_end), (k_begin, k_end) in zip(batch.piece_queries, batch.piece_keys):
            if q_end == q_begin:  # an unused piece of a mixed graph's buffers
                continue
            k = keys[k_begin:k_end].transpose(0, 1)[None]
            v = values[k_begin:k_end].transpose(0, 1)[None]
            out.append(self._causal(q[q_begin:q_end].transpose(0, 1)[None], k, v)[0].transpose(0, 1))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        queries, length = q.shape[2], k.shape[2]
        if queries == length:  # a whole prompt at once: plain causal, the fastest kernels apply
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale, enable_gqa=True)
        # Query i sits at position length - queries + i and sees every key up to it.
        mask = torch.ones(queries, length, dtype=torch.bool, device=q.device).tril(length - queries)
        grouped = {"enable_gqa": True}
        if q.is_cuda:
            # No GPU kernel takes both a mask and grouped heads: with enable_gqa this fell back
            # to the math path, ~0.6 ms of host time per layer (measured on an H200).
            group = self._heads // self._kv_heads
            k, v, grouped = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self._scale, **grouped)


class FlexPagedDecode:
    """One-token rows over the pool, through a block mask built from block tables.

    Each row of the block mask lists its request's blocks. With full_blocks, all but the last
    are "full" (the mask function skipped); but then flex decoding splits the whole KV length
    (here the whole pool) between its splits, so one split does all of a row's full blocks
    (measured on an H200: a tenth of the copy bandwidth with two splits). Without, all are
    "partial" and split evenly. The mask function checks a key's physical block is the one
    the row's table holds at that block's logical index, and its position is below the
    length (uncompiled flex, the CPU's, evaluates it over the whole pool).

    Two layouts. By slot: the mask's rows are the runner's slots, read from its table in
    place; a step's rows go to their slots' places and idle slots attend to nothing. By row,
    for the smaller decode graphs (`batch.row_layout`): a mask of the graph's own row count,
    whose tables and lengths are gathered from the rows' slots once per step. On an H200 the
    slot layout made a step with 1-8 live requests pay for all 256 slots: ~20 us a layer of
    flex programs with nothing to read, plus zeroing, scattering and gathering the queries
    (benchmarks/step_kernels.py: 0.7-0.8 ms of a 6.0 ms Llama-3-8B step).
    """

    def __init__(self, slots: int, table: torch.Tensor, logical: torch.Tensor, block_size: int, pool_tokens: int,
                 heads: int, head_dim: int, scale: float, device: torch.device, dtype: torch.dtype, compile: bool,
                 kernel_options: dict | None = None, full_blocks: bool = False):
        from torch.nn.attention.flex_attention import flex_attention

        self._slots, self._heads, self._head_dim, self._scale = slots, heads, head_dim, scale
        self._table = table  # [slots, blocks a request may hold], int32, updated in place by the runner
        self._logical, self._block_size, self._pool_tokens = logical, block_size, pool_tokens
        self._device, self._full_blocks = device, full_blocks
        # Tokens each slot attends to this step; 0 for slots not decoding.
        self.lengths = torch.zeros(slots, dtype=torch.int32, device=device)
        self._by_slot = _PagedBlockMask(table, self.lengths, logical, block_size, pool_tokens, full_blocks)
        self._by_rows: dict[int, _PagedBlockMask] = {}
        self._flex = torch.compile(flex_attention, dynamic=False, fullgraph=True) if compile else flex_attention
        self._query = torch.zeros(slots, heads, 1, head_dim, device=device, dtype=dtype)
        self._kernel_options = dict(kernel_options) if kernel_options else None
        # A float8 pool: the layer's key scale, set before each layer's call (one buffer, so
        # the compiled kernel is the same for every layer), applied to the scores.
        self._key_scale = torch.ones(1, dtype=torch.float32, device=device)
        key_scale = self._key_scale

        def scaled(score, batch, head, query, key):
            return score * key_scale[0]

        self._scaled = scaled
        # The casts around a float8 call, one fused kernel each under compile (eager: two
        # or three each, 28 layers a step, which a small model's decode step notices).
        self._to_fp8 = torch.compile(_query_to_fp8, dynamic=False) if compile else _query_to_fp8
        self._from_fp8 = torch.compile(_output_from_fp8, dynamic=False) if compile else _output_from_fp8

    def _rows_mask(self, rows: int) -> "_PagedBlockMask":
        """The mask for a row layout of `rows` rows, made at its graph's warm-up (outside capture)."""
        mask = self._by_rows.get(rows)
        if mask is None:
            table = torch.zeros(rows, self._table.shape[1], dtype=torch.int32, device=self._device)
            lengths = torch.zeros(rows, dtype=torch.int32, device=self._device)
            mask = self._by_rows[rows] = _PagedBlockMask(table, lengths, self._logical, self._block_size,
                                                        self._pool_tokens, self._full_blocks)
        return mask

    def prepare(self, batch) -> None:
        """Point the block mask at this step's lengths and tables (in place, so a CUDA graph
        sees it). A CUDA graph's batch carries none: its lengths were copied in before the replay."""
        if batch.slot_lengths is not None:
            self.lengths.copy_(batch.slot_lengths)
        if batch.row_layout:
            mask = self._rows_mask(batch.num_decodes)
            mask.lengths.copy_(self.lengths[batch.decode_slots])
            mask.table.copy_(self._table[batch.decode_slots])
            mask.point()
            return
        self._by_slot.point()

    def decode(self, q: torch.Tensor, pool, layer: int, batch) -> torch.Tensor:
        if batch.row_layout:
            return self._attend(q[:, :, None], pool, layer, self._rows_mask(batch.num_decodes).mask)[:, :, 0]
        if batch.decode_all_slots:
            query = q[:, :, None]
        else:
            # Rows go to their slots' places: the block mask is laid out by slot.
            query = self._query.zero_()
            query[batch.decode_slots] = q[:, :, None]
        out = self._attend(query, pool, layer, self._by_slot.mask)[:, :, 0]
        return out if batch.decode_all_slots else out[batch.decode_slots]

    def _attend(self, query: torch.Tensor, pool, layer: int, mask) -> torch.Tensor:
        keys, values = pool.heads_view(layer)
        extra = {"kernel_options": self._kernel_options} if self._kernel_options else {}
        if not pool.quantized:
            return self._flex(query, keys, values, block_mask=mask, scale=self._scale, enable_gqa=True, **extra)
        # A float8 pool: flex's float8 products want every operand in float8, so the queries
        # are cast too (unscaled, saturating); keys are stored / their scale, undone on the
        # scores, values / theirs, undone on the output, which flex returns in float8.
        self._key_scale.fill_(pool.key_scales[layer])
        out = self._flex(self._to_fp8(query), keys, values, score_mod=self._scaled, block_mask=mask, scale=self._scale,
                         enable_gqa=True, **extra)
        return self._from_fp8(out, query.dtype, pool.value_scales[layer])


def _query_to_fp8(query: torch.Tensor) -> torch.Tensor:
    return to_fp8(query, 1.0)


def _output_from_fp8(out: torch.Tensor, dtype: torch.dtype, value_scale: float) -> torch.Tensor:
    return out.to(dtype) * value_scale


class _PagedBlockMask:
    """A flex block mask whose row r reads the blocks of table[r] up to lengths[r] (both
    updated in place by its owner; `point` refreshes the mask's block lists from them)."""

    def __init__(self, table: torch.Tensor, lengths: torch.Tensor, logical: torch.Tensor, block_size: int,
                 pool_tokens: int, full_blocks: bool):
        from torch.nn.attention.flex_attention import BlockMask

        self.table, self.lengths, self._block_size, self._full_blocks = table, lengths, block_size, full_blocks
        rows, device = table.shape[0], table.device
        as_int = {"dtype": torch.int32, "device": device}
        self._rows = torch.arange(rows, device=device)
        # Compiled flex takes the KV length from the index tensors' last dimension, so they
        # span the whole pool; the first table-width columns hold each row's table.
        blocks = pool_tokens // block_size
        self._count = torch.zeros(rows, 1, 1, **as_int)
        self._index = torch.zeros(rows, 1, 1, blocks, **as_int)
        full = {}
        if full_blocks:
            self._full_count = torch.zeros(rows, 1, 1, **as_int)
            self._full_index = torch.zeros(rows, 1, 1, blocks, **as_int)
            full = {"full_kv_num_blocks": self._full_count, "full_kv_indices": self._full_index}
        size = block_size

        def live(batch, head, query, key):
            block = key // size
            index = logical[block]
            return (table[batch, index] == block) & (index * size + key % size < lengths[batch])

        extra = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {}
        self.mask = BlockMask.from_kv_blocks(self._count, self._index, **full, BLOCK_SIZE=(size, size),
                                             mask_mod=live, seq_lengths=(1, pool_tokens), **extra)

    def point(self) -> None:
        width, size = self.table.shape[1], self._block_size
        if not self._full_blocks:
            self._count.view(-1).copy_((self.lengths + size - 1) // size)
            self._index[:, 0, 0, :width].copy_(self.table)
            return
        full = self.lengths // size
        self._full_count.view(-1).copy_(full)
        self._full_index[:, 0, 0, :width].copy_(self.table)
        self._count.view(-1).copy_((self.lengths % size != 0).to(torch.int32))
        self._index[:, 0, 0, 0].copy_(self.table[self._rows, full.clamp(max=width - 1).long()])


class VarlenPrefill:
    """All of a step's prompt pieces in one variable-length flash attention call per layer."""

    def __init__(self, varlen):
        self._varlen = varlen

    def prefill(self, q: torch.Tensor, pool, layer: int, batch) -> torch.Tensor:
        keys, values = pool.gather(layer, batch.piece_gather)
        return self._varlen(q, keys, values, batch.piece_cu_queries, batch.piece_cu_keys, batch.piece_longest_query,
                            batch.piece_longest_key)


def varlen_attention(kv_heads: int, heads: int, scale: float, device: torch.device | None = None):
    """torch's variable-length flash attention as causal(q, k, v, cu_q, cu_k, longest_q, longest_k),
    causal aligned to each sequence's end (a piece's queries are the last of its keys), or None
    where this torch has none. Its keyword arguments changed between releases."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepted = inspect.signature(varlen_attn).parameters
    options = {}
    if "window_size" in accepted:
        options["window_size"] = (-1, 0)  # FlashAttention's causal: bottom-right aligned
    elif "is_causal" in accepted:
        options["is_causal"] = True
    else:
        return None
    grouped = "enable_gqa" in accepted
    if grouped:
        options["enable_gqa"] = True
    group = heads // kv_heads
    if not grouped and group > 1 and device is not None:
        grouped = _takes_grouped_keys(varlen_attn, options, kv_heads, heads, device)

    def causal(q, k, v, cu_q, cu_k, longest_q: int, longest_k: int) -> torch.Tensor:
        if not grouped and group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, longest_q, longest_k,
                           scale=scale, **options)

    log.info("prefill: a step's prompt pieces share one varlen flash attention call per layer (%s; keys %s)",
             ", ".join(f"{k}={v}" for k, v in options.items()),
             "grouped" if grouped or group == 1 else f"repeated for each of {group} query heads")
    return VarlenPrefill(causal)


def _takes_grouped_keys(varlen_attn, options: dict, kv_heads: int, heads: int, device: torch.device) -> bool:
    """Whether this torch's varlen flash attention takes keys and values with fewer heads than
    the queries though it has no enable_gqa (torch 2.11's has none; FlashAttention itself maps
    query head h to key head h // group). Repeating them for each query head copied the
    gathered keys and values twice over at every layer, and the kernel read them twice: on an
    H100 the copy alone was 0.58 ms of a 13.9 ms sustained step (benchmarks/serving_gpu.py
    --profile-steps). Tried once at start on a small case against the repeated keys."""
    if device.type != "cuda":
        return False
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        shape = {"device": device, "dtype": torch.bfloat16, "generator": generator}
        q = torch.randn(24, heads, 64, **shape)
        k, v = torch.randn(40, kv_heads, 64, **shape), torch.randn(40, kv_heads, 64, **shape)
        cu_q = torch.tensor([0, 8, 24], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 16, 40], dtype=torch.int32, device=device)
        group = heads // kv_heads
        native = varlen_attn(q, k, v, cu_q, cu_k, 16, 24, scale=0.125, **options)
        repeated = varlen_attn(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), cu_q, cu_k,
                               16, 24, scale=0.125, **options)
        if torch.allclose(native.float(), repeated.float(), atol=1e-2, rtol=0):
            return True
        log.info("varlen attention with grouped keys differs from repeated keys here; repeating them")
    except Exception as exc:  # noqa: BLE001 - any refusal means: repeat them
        log.info("varlen attention refused grouped keys (%s); repeating them", exc)
    return False
