"""Model runners: run one step's chunks through the model over the paged KV cache.

A step is a list of chunks, one per request: a piece of a prompt or the one
token it decodes. All chunks run in one forward pass, so prompt pieces and
decodes share the weight reads; the runner returns a row of logits for each
position a chunk asks for (its last token, or a scoring request's several).

`PagedRunner` is the fast path for the Llama family (Llama, Qwen2, Qwen3,
Mistral): it reuses the checkpoint's modules but runs its own attention over
one pool of KV blocks allocated at start (workers/hf/kv_cache.py), read
through each request's block table. `GenericRunner` serves any other causal
LM transformers loads, one request at a time with a DynamicCache each.

Runners declare what they can do (`Capabilities`); the engine reads that and
never asks what class a runner is.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import FlexPagedDecode, PagedSdpa, VarlenPrefill, varlen_attention
from .graphs import DecodeGraphs, check_graph_sizes, decode_graph_sizes
from .kv_cache import KVPool, to_device
from .quant import Fp8Linear, linear
from .scheduler import Chunk

PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
log = logging.getLogger("batchd.engine.hf")

FAST_PATH_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

# Decode attention kernel settings for Hopper and later, from benchmarks/flex_decode_sweep.py
# on an H200 (2026-12-02, torch 2.11): torch's default there loads without pipelining
# (num_stages 1); three stages, splitting each request's KV in two as well, read live KV
# at 94% of the copy bandwidth against 77% (docs/performance.md).
FLEX_DECODE_OPTIONS_SM90 = {"num_stages": 3, "SPLIT_KV": 2}


@dataclass(frozen=True)
class Capabilities:
    # Blocks are shared between requests (a prefix in the pool is read in place by many).
    prefix_caching: bool
    # Chunks may read their token from the previous step's sampled tokens on the device,
    # so the engine can queue step N+1 before it reads step N back.
    overlap: bool
    # A chunk may ask for several rows of logits (scoring requests run in the steps).
    multi_row_logits: bool


def supports_fast_path(model: Any) -> bool:
    config = model.config
    if config.model_type not in FAST_PATH_MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        return False
    # Mistral applies its sliding window on every layer when one is set.
    return not (config.model_type == "mistral" and getattr(config, "sliding_window", None))


class PagedRunner:
    """Llama-family forward pass over a paged KV pool.

    attention: "sdpa" (gathers keys into place; the CPU default) or "flex" (reads the
    pool through the block tables; the default on CUDA). cuda_graph: replay decode
    steps from CUDA graphs (CUDA with flex only), one per size in cuda_graph_sizes;
    a step replays the smallest that holds its rows. By default the sizes are
    `decode_graph_sizes(slots)`, and those that replay no faster than the graph over
    every slot are dropped at start.
    """

    capabilities = Capabilities(prefix_caching=True, overlap=True, multi_row_logits=True)

    def __init__(self, model: Any, slots: int, num_blocks: int, block_size: int, max_context: int,
                 attention: str | None = None, cuda_graph: bool | None = None, compile_decode: bool | None = None,
                 cuda_graph_sizes: tuple[int, ...] | None = None, kv_layout: str = "head",
                 mixed_graph_tokens: list[int] | None = None, kv_storage: torch.dtype | None = None):
        self._model = model
        self._body = model.model
        self._layers = list(self._body.layers)
        config = model.config
        first = self._layers[0].self_attn
        self._head_dim = first.head_dim
        self._heads = config.num_attention_heads
        self._kv_heads = config.num_key_value_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots, self.block_size = slots, block_size
        self._scale = first.scaling
        on_cuda = self.device.type == "cuda"
        self.attention = attention or ("flex" if on_cuda else "sdpa")
        self.pool = KVPool(len(self._layers), num_blocks, block_size, self._kv_heads, self._head_dim, self.dtype,
                           self.device, kv_layout, kv_storage)
        self.cache_bytes = self.pool.bytes
        # Each slot's block table, and each block's index in the tables that hold it (one
        # index, as a shared block sits at the same place in every request holding it).
        self.table = torch.zeros(slots, -(-max_context // block_size), dtype=torch.int32, device=self.device)
        self.logical = torch.zeros(num_blocks, dtype=torch.int32, device=self.device)
        self._bound: list[list[int] | None] = [None] * slots  # the table list each slot mirrors
        self._bound_length = [0] * slots
        self.decode_attention = self._make_decode_attention(on_cuda)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rotate = apply_rotary_pos_emb
        self._qkv_sizes = _fuse_projections(self._layers)
        # Prompt pieces go through one variable-length flash attention call per layer instead
        # of one call each: on a GPU each call costs ~50 us of host time, and a step with 15
        # prompts over 28 layers spent most of its time launching them.
        self.prefill_attention = (varlen_attention(self._kv_heads, self._heads, self._scale, self.device)
                                  if on_cuda and self.dtype in (torch.float16, torch.bfloat16) else None)
        self.prefill_attention = self.prefill_attention or PagedSdpa(self._heads, self._kv_heads, self._head_dim,
                                                                     self._scale)
        self.graphs: DecodeGraphs | None = None
        self._compiled, self._compiled_any_shape = None, None
        if cuda_graph is None:
            cuda_graph = on_cuda and self.attention == "flex"
        if cuda_graph and compile_decode is not False:
            self._compiled, self._compiled_any_shape = self._compile_dense_parts()
        self._check_prefill()  # before any capture: a graph must hold the prompt path that works
        if self.pool.quantized:
            self._calibrate_kv(config.vocab_size)  # graphs keep the scales they were captured with
        if cuda_graph:
            sizes = check_graph_sizes(cuda_graph_sizes or decode_graph_sizes(slots), slots)
            # The exact prompt path reads its pieces' bounds from host lists, which a captured
            # graph would keep from the capture: mixed graphs need the varlen path (bf16/fp16).
            self._capture_with_fallback(sizes, mixed_graph_tokens if isinstance(self.prefill_attention, VarlenPrefill)
                                        else None)
            if cuda_graph_sizes is None:
                self.graphs.keep_those_that_pay()

    def _make_decode_attention(self, on_cuda: bool):
        if self.attention == "sdpa":
            return PagedSdpa(self._heads, self._kv_heads, self._head_dim, self._scale)
        if self.attention != "flex":
            raise ValueError(f"attention {self.attention!r} is not one of sdpa, flex")
        tuned = on_cuda and torch.cuda.get_device_capability(self.device) >= (9, 0)
        return FlexPagedDecode(self.slots, self.table, self.logical, self.block_size,
                               self.pool.num_blocks * self.block_size, self._heads, self._head_dim, self._scale,
                               self.device, self.dtype, compile=on_cuda,
                               kernel_options=FLEX_DECODE_OPTIONS_SM90 if tuned else None)

    def release(self, slot: int) -> None:
        """Nothing to free: the pool's blocks belong to the block manager, and a slot's table
        row is written again for its next request."""

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Queue copies of shared positions between blocks, before the step that reads them."""
        self.pool.copy(copies)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], previous: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Chunk]]:
        """Logits [rows, vocab] and the chunk each row belongs to (a chunk with several
        logit offsets has several rows, in offset order).

        previous: the last step's sampled tokens, for chunks with from_previous set.
        """
        self._update_tables(chunks)
        if self.graphs is not None:
            if all(len(c.token_ids) == 1 for c in chunks):
                wanted = [c for c in chunks if c.logit_rows()]
                return self.graphs.replay(chunks, wanted, previous), wanted
            replayed = self.graphs.replay_mixed(chunks, previous)
            if replayed is not None:
                return replayed
        batch = StepBatch(chunks, self, previous)
        return self.forward_batch(batch).float(), batch.logit_chunks

    def _update_tables(self, chunks: list[Chunk]) -> None:
        """Copy the block ids the device has not seen yet into the slots' table rows (a table
        only grows while its request runs; a slot's next request writes its row anew)."""
        rows, columns, blocks = [], [], []
        for chunk in chunks:
            table, slot = chunk.block_table, chunk.slot
            start = self._bound_length[slot] if self._bound[slot] is table else 0
            if len(table) > start:
                rows += [slot] * (len(table) - start)
                columns += range(start, len(table))
                blocks += table[start:]
            self._bound[slot], self._bound_length[slot] = table, len(table)
        if blocks:
            count = len(blocks)
            staged = to_device(rows + columns + blocks, torch.long, self.device)
            rows_t, columns_t, blocks_t = staged[:count], staged[count:2 * count], staged[2 * count:]
            self.table[rows_t, columns_t] = blocks_t.to(torch.int32)
            self.logical[blocks_t] = columns_t.to(torch.int32)

    def physical(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where in the pool each (slot, position) lives; position -1 is the scratch block's."""
        at = positions.clamp(min=0)
        index = self.table[slots, at // self.block_size].long() * self.block_size + at % self.block_size
        return torch.where(positions >= 0, index, 0)

    def piece_key_positions(self, slots: torch.Tensor, key_lengths: torch.Tensor, total: int) -> torch.Tensor:
        """Where each piece's keys (positions [0, key length) of its slot) live, piece after piece."""
        piece_of_key = torch.repeat_interleave(torch.arange(len(slots), device=self.device), key_lengths,
                                               output_size=total)
        starts = torch.cumsum(key_lengths, 0) - key_lengths
        return self.physical(slots[piece_of_key], torch.arange(total, device=self.device) - starts[piece_of_key])

    def forward_batch(self, batch: StepBatch) -> torch.Tensor:
        hidden = self._body.embed_tokens(batch.token_ids)[None]
        cos, sin = self._body.rotary_emb(hidden, batch.positions.clamp(min=0)[None])
        write_index = self.physical(batch.slots, batch.positions)
        if batch.num_decodes:
            self.decode_attention.prepare(batch)
        # cuDNN attention builds a plan for every new prompt-piece shape: measured at
        # ~1.9 ms of host time per call on an H100, 100x its 19 us kernel.
        with sdpa_kernel(PREFILL_BACKENDS):
            for index, layer in enumerate(self._layers):
                hidden = self._layer(index, layer, hidden, cos, sin, batch, write_index)
        last = hidden[0, batch.logit_rows]
        return self._model.lm_head(self._body.norm(last))

    def _layer(self, index: int, layer: Any, hidden: torch.Tensor, cos, sin, batch: StepBatch,
               write_index: torch.Tensor) -> torch.Tensor:
        project, finish = self._dense_parts(batch)
        if self.pool.stores_in_projection:
            q = project(layer, hidden, cos, sin, into=(self.pool.layer(index), write_index))
        else:
            q, k, v = project(layer, hidden, cos, sin)
            self.pool.write(index, write_index, k[0].transpose(0, 1), v[0])
        q = q[0].transpose(0, 1)  # [tokens, heads, head_dim]
        parts, decodes = [], batch.num_decodes
        if decodes:
            parts.append(self.decode_attention.decode(q[:decodes], self.pool, index, batch))
        if batch.num_tokens > decodes:
            parts.append(self.prefill_attention.prefill(q[decodes:], self.pool, index, batch))
        return finish(layer, hidden, torch.cat(parts) if len(parts) > 1 else parts[0])

    def _dense_parts(self, batch: StepBatch):
        """The layer's work around attention, compiled (fused norms, rotary, SiLU): for the
        shape of the decode graph over every slot, and once more for any token count, for
        steps that carry prompt pieces (unfused, their elementwise kernels took half of such a
        step's GPU time) and for the smaller decode graphs, which so cost no compile of their own."""
        if batch.decode_all_slots and batch.num_tokens == self.slots and self._compiled is not None:
            return self._compiled
        if self._compiled_any_shape is not None:
            return self._compiled_any_shape
        return self._project, self._finish

    def _project(self, layer: Any, hidden: torch.Tensor, cos, sin, into: tuple | None = None):
        """The layer's queries, keys and values, rotated. With `into` (the layer's views of the
        pool, `pool.layer(i)`, and the step's physical positions) the keys and values go
        straight into the pool and only the queries come back: compiled, the store is part of
        the projection's kernels."""
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        tokens = x.shape[1]
        if self._qkv_sizes:
            q, k, v = linear(x, attention.fused_qkv, attention.fused_qkv_bias,
                             attention.fused_qkv_scale).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        q = q.view(1, tokens, self._heads, self._head_dim)
        k = k.view(1, tokens, self._kv_heads, self._head_dim)
        v = v.view(1, tokens, self._kv_heads, self._head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head before rotating it
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if into is None:
            return q, k, v
        layer_kv, positions = into
        self.pool.store(layer_kv, positions, k[0].transpose(0, 1), v[0])
        return q

    def _finish(self, layer: Any, hidden: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        hidden = hidden + layer.self_attn.o_proj(attention_out.reshape(1, hidden.shape[1], -1))
        x = layer.post_attention_layernorm(hidden)
        if not self._qkv_sizes:
            return hidden + layer.mlp(x)
        gate, up = linear(x, layer.mlp.fused_gate_up, None, layer.mlp.fused_gate_up_scale).chunk(2, dim=-1)
        return hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    # -- start-up: compiling, checking the prompt path, capturing graphs ---------------

    def _compile_dense_parts(self):
        import torch._dynamo

        # One compiled graph per layer (each layer's weights and its views of the pool are
        # guarded), all of the same code, so inductor's cache compiles the kernels once. Each
        # engine a process builds (tests, benchmarks) adds its own, hence the room.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 16 * len(self._layers)))
        fixed = (torch.compile(self._project, dynamic=False), torch.compile(self._finish, dynamic=False))
        return fixed, (torch.compile(self._project, dynamic=True), torch.compile(self._finish, dynamic=True))

    def _calibrate_kv(self, vocab_size: int, prompts: int = 4) -> None:
        """A float8 pool's scales, from the keys and values of a few prompts of random tokens
        (each written into the scratch block only, as _check_prefill's are)."""
        generator = torch.Generator().manual_seed(0)
        length = min(127, self.block_size - 1)
        with torch.inference_mode(), self.pool.calibrating():
            for _ in range(prompts):
                tokens = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
                self.forward_batch(StepBatch([Chunk(0, tokens, 0, block_table=[0])], self, None))
        pool = self.pool
        log.info("float8 KV cache: key scales %.3g-%.3g, value scales %.3g-%.3g over %d layers",
                 min(pool.key_scales), max(pool.key_scales), min(pool.value_scales), max(pool.value_scales),
                 len(pool.key_scales))

    def _check_prefill(self) -> None:
        """Run throwaway prompts through the prompt path at start: it compiles the any-shape
        layers now rather than at the first request, and proves this torch's varlen kernel
        takes the call. What fails is turned off (varlen first, then the compiled layers) and
        logged, so a worker starts on a slower path rather than failing every prompt. They
        write into the scratch block only (slot 0's table row is all zeros until its first
        request), and the second continues the first, so both kinds of piece are tried."""
        if self._compiled_any_shape is None and isinstance(self.prefill_attention, PagedSdpa):
            return
        while True:
            try:
                with torch.inference_mode():
                    first = min(17, self.block_size - 1)
                    for start, length in ((0, first), (first, min(23, self.block_size - first))):
                        chunk = Chunk(0, [0] * length, start, block_table=[0])
                        self.forward_batch(StepBatch([chunk], self, None))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # a kernel's failure shows here
                return
            except Exception:
                if not isinstance(self.prefill_attention, PagedSdpa):
                    log.exception("varlen attention failed on this torch; prompt pieces attend one call each")
                    self.prefill_attention = PagedSdpa(self._heads, self._kv_heads, self._head_dim, self._scale)
                elif self._compiled_any_shape is not None:
                    log.exception("compiling the prefill layers failed; steps with prompt pieces run them uncompiled")
                    self._compiled_any_shape = None
                else:
                    raise

    def _capture_with_fallback(self, sizes: tuple[int, ...], mixed_tokens: list[int] | None) -> None:
        """Capture the graphs; a compiler or kernel that fails must not stop a worker: without
        the mixed graphs, then without the compiled layers, it is correct, only slower."""
        attempts = [(mixed_tokens, True), (None, True), (None, False)]
        for index, (mixed, compiled) in enumerate(attempts):
            if not compiled:
                self._compiled = self._compiled_any_shape = None
            try:
                self.graphs = DecodeGraphs(self, sizes, mixed)
                return
            except Exception:
                if index == len(attempts) - 1:
                    raise
                log.exception("capturing the %s failed; trying without them",
                              "mixed-step graphs" if mixed else "compiled layers")


class StepBatch:
    """One step's chunks flattened into tensors: token ids, positions and slots for every
    token, the logit rows, and what each attention path needs to find its keys."""

    decode_all_slots = False
    row_layout = False  # decode rows attend through a mask of their own row count (smaller decode graphs)
    slot_lengths: torch.Tensor | None = None  # each slot's attended length, for flex decode

    def __init__(self, chunks: list[Chunk], runner: PagedRunner, previous: torch.Tensor | None):
        # One-token rows first, ordered by slot; a one-token prompt piece attends exactly like a
        # decode, so it joins them. Pieces of several tokens follow.
        decodes = sorted((c for c in chunks if len(c.token_ids) == 1), key=lambda c: c.slot)
        pieces = [c for c in chunks if len(c.token_ids) > 1]
        self.order = decodes + pieces
        self.num_decodes = len(decodes)
        token_ids, positions, slot_of, logit_rows, offsets = [], [], [], [], []
        self.logit_chunks = []
        for chunk in self.order:
            offsets.append(len(token_ids))
            for row in chunk.logit_rows():
                logit_rows.append(len(token_ids) + row)
                self.logit_chunks.append(chunk)
            token_ids += chunk.token_ids
            positions += range(chunk.start, chunk.start + len(chunk.token_ids))
            slot_of += [chunk.slot] * len(chunk.token_ids)
        self.num_tokens = tokens = len(token_ids)
        carried = [(offset, c.from_previous) for offset, c in zip(offsets, self.order) if c.from_previous is not None]
        key_lengths = [c.start + len(c.token_ids) for c in pieces]
        lengths = [c.start + 1 for c in decodes]
        staged = to_device(token_ids + positions + slot_of + logit_rows + [o for o, _ in carried]
                           + [r for _, r in carried] + lengths + [c.slot for c in pieces] + key_lengths,
                           torch.long, runner.device)
        self.token_ids, self.positions, self.slots = staged[:tokens], staged[tokens:2 * tokens], staged[2 * tokens:3 * tokens]
        rest = staged[3 * tokens:]
        self.logit_rows, rest = rest[:len(logit_rows)], rest[len(logit_rows):]
        if carried:
            into, taken, rest = rest[:len(carried)], rest[len(carried):2 * len(carried)], rest[2 * len(carried):]
            self.token_ids.index_copy_(0, into, previous.index_select(0, taken))
        lengths_t, rest = rest[:len(decodes)], rest[len(decodes):]
        if decodes:
            self._decode_views(runner, lengths, lengths_t)
        if pieces:
            self._piece_views(runner, pieces, key_lengths, rest[:len(pieces)], rest[len(pieces):])

    def _decode_views(self, runner: PagedRunner, lengths: list[int], lengths_t: torch.Tensor) -> None:
        rows = len(lengths)
        self.decode_slots = self.slots[:rows]
        longest = max(lengths)
        if isinstance(runner.decode_attention, PagedSdpa):
            span = torch.arange(longest, device=runner.device)
            self.decode_mask = (span[None, :] < lengths_t[:, None])[:, None, None, :]
            # Past its length a row re-reads its last position (masked): its table ends there.
            at = torch.minimum(span[None, :], lengths_t[:, None] - 1)
            self.decode_gather = runner.physical(self.decode_slots[:, None].expand(rows, longest), at)
        else:
            self.slot_lengths = torch.zeros(runner.slots, dtype=torch.int32, device=runner.device)
            self.slot_lengths[self.decode_slots] = lengths_t.to(torch.int32)

    def _piece_views(self, runner: PagedRunner, pieces: list[Chunk], key_lengths: list[int], slots: torch.Tensor,
                     key_lengths_t: torch.Tensor) -> None:
        """Each piece attends to its request's positions [0, start + length): their physical
        places, one piece after another (`piece_gather`), and the bounds of its queries and keys."""
        query_bounds = [0, *itertools.accumulate(len(c.token_ids) for c in pieces)]
        key_bounds = [0, *itertools.accumulate(key_lengths)]
        self.piece_queries = list(zip(query_bounds, query_bounds[1:]))
        self.piece_keys = list(zip(key_bounds, key_bounds[1:]))
        device = runner.device
        self.piece_gather = runner.piece_key_positions(slots, key_lengths_t, key_bounds[-1])
        bounds = to_device(query_bounds + key_bounds, torch.int32, device)
        self.piece_cu_queries, self.piece_cu_keys = bounds[:len(query_bounds)], bounds[len(query_bounds):]
        self.piece_longest_query = max(len(c.token_ids) for c in pieces)
        self.piece_longest_key = max(key_lengths)

    @classmethod
    def static_mixed(cls, slots: int, tokens: int, pieces: int, keys: int, max_context: int,
                     device: torch.device) -> StepBatch:
        """Static buffers for a step of every slot's decode row and `tokens` prompt tokens in up
        to `pieces` pieces (the last: padding) whose keys fill `keys` gathered positions.
        Until filled, the whole prompt part is one padding piece over scratch keys."""
        batch = cls.static_decode(slots, slots, device)
        batch.num_tokens = slots + tokens
        batch.token_ids = torch.zeros(slots + tokens, dtype=torch.long, device=device)
        batch.positions = torch.full((slots + tokens,), -1, dtype=torch.long, device=device)
        batch.slots = torch.cat([torch.arange(slots, device=device), torch.zeros(tokens, dtype=torch.long, device=device)])
        batch.decode_slots = batch.slots[:slots]
        batch.logit_rows = torch.zeros(slots + pieces - 1, dtype=torch.long, device=device)
        bounds = torch.tensor([0] + [tokens] * pieces, dtype=torch.int32, device=device)
        batch.piece_cu_queries, batch.piece_cu_keys = bounds, bounds.clone()
        batch.piece_gather = torch.zeros(keys, dtype=torch.long, device=device)
        batch.piece_longest_query, batch.piece_longest_key = tokens, max(max_context, tokens)
        batch.piece_queries = batch.piece_keys = [(0, tokens)]
        return batch

    @classmethod
    def static_decode(cls, rows: int, slots: int, device: torch.device) -> StepBatch:
        """Static buffers for a decode step of `rows` one-token rows, for a CUDA graph to read.
        Over every slot, row i is slot i; otherwise `slots` says each row's slot. Positions
        start at -1 (the scratch block). The decode attention's lengths are set in place
        before each replay (slot_lengths stays None)."""
        batch = cls.__new__(cls)
        batch.decode_all_slots = rows == slots
        batch.row_layout = rows < slots
        batch.num_decodes = batch.num_tokens = rows
        batch.token_ids = torch.zeros(rows, dtype=torch.long, device=device)
        batch.positions = torch.full((rows,), -1, dtype=torch.long, device=device)
        batch.slots = batch.decode_slots = torch.arange(rows, device=device)
        batch.logit_rows = torch.arange(rows, device=device)
        return batch


def _fuse_projections(layers: list[Any]) -> tuple[int, int, int] | None:
    """One weight for q, k and v, and one for gate and up, per layer: 4 matrix products per
    layer instead of 7. At decode batch sizes each product is bound by its launch and the
    weight read, not by arithmetic (~5 us each on an H200, 7 per layer, 28 layers).

    The fused weights are non-persistent buffers of the attention and MLP modules (fused_qkv,
    fused_qkv_bias, fused_gate_up), and the projections keep their weights as views into
    them: nothing is held twice, the model's own forward (scoring, references) reads the
    same numbers, and the compiler sees each layer's weights the same way, so it compiles
    one layer and reuses it for the rest. (Kept in a dict outside the modules, with shapes
    left dynamic, every layer compiled anew: the 0.6B engine took ~3 minutes to start on an
    H200; benchmarks/compile_reuse.py shows it on a CPU.)

    Returns the (q, k, v) output sizes, or None where the layers are left alone (quantized
    or otherwise unusual weights, or an MLP of another shape).
    """
    plans = []
    for layer in layers:
        attention, mlp = layer.self_attn, getattr(layer, "mlp", None)
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        linears = projections + [mlp.gate_proj, mlp.up_proj]
        kinds = {type(m) for m in linears}
        if len(kinds) != 1 or not kinds <= {torch.nn.Linear, Fp8Linear} \
                or not all(type(m.weight.data) is torch.Tensor for m in linears):
            return None
        biases = [p.bias for p in projections]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            return None
        plans.append((attention, mlp, projections, biases))
    sizes = tuple(p.weight.shape[0] for p in plans[0][2]) if plans else None
    with torch.no_grad():
        for attention, mlp, projections, biases in plans:
            qkv = torch.cat([p.weight for p in projections])
            bias = torch.cat(biases) if biases[0] is not None else None
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            for module, part in zip(projections, qkv.split(sizes)):
                module.weight.data = part
            if bias is not None:
                for module, part in zip(projections, bias.split(sizes)):
                    module.bias.data = part
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up.chunk(2)
            # Float8 weights have one scale per output channel: fusing them concatenates
            # the scales the same way (None for weights in the model's dtype).
            qkv_scale = gate_up_scale = None
            if isinstance(mlp.gate_proj, Fp8Linear):
                qkv_scale = torch.cat([p.weight_scale for p in projections])
                gate_up_scale = torch.cat([mlp.gate_proj.weight_scale, mlp.up_proj.weight_scale])
                for module, part in zip(projections, qkv_scale.split(sizes)):
                    module.weight_scale = part
                mlp.gate_proj.weight_scale, mlp.up_proj.weight_scale = gate_up_scale.chunk(2)
            attention.register_buffer("fused_qkv", qkv, persistent=False)
            attention.register_buffer("fused_qkv_bias", bias, persistent=False)
            attention.register_buffer("fused_qkv_scale", qkv_scale, persistent=False)
            mlp.register_buffer("fused_gate_up", gate_up, persistent=False)
            mlp.register_buffer("fused_gate_up_scale", gate_up_scale, persistent=False)
    return sizes



class GenericRunner:
    """Any causal LM: one forward per chunk, each slot with its own DynamicCache. Its cache
    is not paged, so the engine's blocks only count memory here: nothing is shared."""

    # Each chunk's tokens go in from the host, and each forward returns one row.
    capabilities = Capabilities(prefix_caching=False, overlap=False, multi_row_logits=False)

    def __init__(self, model: Any, slots: int, max_context: int):
        self._model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._caches: list[Any] = [None] * slots
        self.cache_bytes = 0  # grows on demand; bounded by slots x max_context
        # transformers 5.2x renamed forward's past_key_values to cache (the old name goes in 5.40).
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def release(self, slot: int) -> None:
        self._caches[slot] = None

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        raise NotImplementedError("the generic path shares no blocks")

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], previous: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Chunk]]:
        from transformers import DynamicCache

        rows = []
        for chunk in chunks:
            if chunk.start == 0 or self._caches[chunk.slot] is None:
                self._caches[chunk.slot] = DynamicCache(config=self._model.config)
            ids = torch.tensor([chunk.token_ids], device=self.device)
            positions = torch.arange(chunk.start, chunk.start + len(chunk.token_ids), device=self.device)
            out = self._model(input_ids=ids, use_cache=True, position_ids=positions[None], cache_position=positions,
                              logits_to_keep=1, **{self._cache_arg: self._caches[chunk.slot]})
            if chunk.want_logits:
                rows.append(out.logits[0, -1].float())
        logits = torch.stack(rows) if rows else torch.empty(0, self._model.config.vocab_size, device=self.device)
        return logits, [c for c in chunks if c.want_logits]
