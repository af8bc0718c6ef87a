"""Model runners: run one step's token chunks through the model over the slots' KV cache.

A step is a list of chunks, one per slot: a piece of a prompt (prefill) or the
one last sampled token (decode). All chunks run in one forward pass, so
prefill and decode share the weight reads; the runner returns the logits of
each chunk's last token.

`LlamaRunner` is the fast path for the Llama family (Llama, Qwen2, Qwen3,
Mistral): it reuses the checkpoint's modules but runs its own attention over a
cache it allocates once. `GenericRunner` serves any other causal LM
transformers loads, one slot at a time with a DynamicCache each.
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

from .attention import KV_BLOCK, FlexDecode, SdpaDecode

PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
log = logging.getLogger("batchd.engine.hf")

FAST_PATH_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

# Decode attention kernel settings for Hopper and later, from benchmarks/flex_decode_sweep.py
# on an H200 (2026-12-02, torch 2.11): torch's default there loads without pipelining
# (num_stages 1) and read live KV at 3,283 GB/s; three stages read it at 3,909 GB/s,
# splitting each slot's KV in two as well at 4,003 GB/s (the copy bandwidth is ~4,150).
FLEX_DECODE_OPTIONS_SM90 = {"num_stages": 3, "SPLIT_KV": 2}


@dataclass
class Chunk:
    slot: int
    token_ids: list[int]
    start: int  # position of token_ids[0] in the sequence
    want_logits: bool = True  # False for a prompt piece that is not the last
    # Offsets within the chunk whose logits are wanted, where it is not just the last
    # token: a scoring request asks for every position of its continuation.
    logit_offsets: tuple[int, ...] | None = None
    # The row of the previous step's sampled tokens that is this chunk's one token, when
    # that step is still running: the token is read on the device, never on the host.
    from_previous: int | None = None

    def logit_rows(self) -> tuple[int, ...]:
        """Offsets within the chunk that get a row of logits."""
        if self.logit_offsets is not None:
            return self.logit_offsets
        return (len(self.token_ids) - 1,) if self.want_logits else ()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the GPU.

    A plain copy from pageable memory synchronises the stream, which would stall the
    host until the step already running ends; a pinned, non-blocking copy just queues.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_length(max_context: int, attention: str) -> int:
    """Positions a slot's cache needs: flex adds one spare position (for slots that are
    not decoding to write into inside a CUDA graph) and rounds up to whole KV blocks."""
    if attention == "flex":
        return -(-(max_context + 1) // KV_BLOCK) * KV_BLOCK
    return max_context


def supports_fast_path(model: Any) -> bool:
    config = model.config
    if config.model_type not in FAST_PATH_MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        return False
    # Mistral applies its sliding window on every layer when one is set.
    return not (config.model_type == "mistral" and getattr(config, "sliding_window", None))


class LlamaRunner:
    """Llama-family forward pass over a per-slot KV cache allocated once.

    attention: "sdpa" or "flex" for decode tokens (flex reads only live blocks;
    the default on CUDA). cuda_graph: replay pure-decode steps from CUDA graphs
    (CUDA with flex only), which removes the per-kernel launch cost that
    dominates small decode steps; one graph per size in cuda_graph_sizes, and a
    step replays the smallest that holds its decoding requests. By default the
    sizes are `decode_graph_sizes(slots)`, and those that replay no faster than
    the graph over every slot are dropped at start.
    """

    def __init__(self, model: Any, slots: int, max_context: int, attention: str | None = None,
                 cuda_graph: bool | None = None, compile_decode: bool | None = None,
                 cuda_graph_sizes: tuple[int, ...] | None = None):
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
        self.slots = slots
        self._scale = first.scaling
        on_cuda = self.device.type == "cuda"
        self.attention = attention or ("flex" if on_cuda else "sdpa")
        context = self._make_decode_attention(max_context, on_cuda)
        self._scratch_position = context - 1
        shape = (len(self._layers), slots, self._kv_heads, context, self._head_dim)
        # Zeroed, not empty: masked-out positions still enter the attention product,
        # and garbage NaNs there would poison it.
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_bytes = 2 * self.keys.numel() * self.keys.element_size()
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rotate = apply_rotary_pos_emb
        self._qkv_sizes = _fuse_projections(self._layers)
        # Whole prompts of a step go through one variable-length flash attention call per
        # layer instead of one call each: on a GPU each call costs ~50 us of host time, and a
        # step with 15 prompts over 28 layers spent most of its time launching them.
        self._varlen = _varlen_attention(self._kv_heads, self._heads) if on_cuda and self.dtype in (
            torch.float16, torch.bfloat16) else None
        self._graphs: list[_DecodeGraph] = []  # smallest first
        self._compiled, self._compiled_any_shape = None, None
        if cuda_graph is None:
            cuda_graph = on_cuda and self.attention == "flex"
        if cuda_graph:
            if compile_decode is not False:
                self._compiled, self._compiled_any_shape = self._compile_dense_parts()
            sizes = _check_graph_sizes(cuda_graph_sizes or decode_graph_sizes(slots), slots)
            self._capture_with_fallback(sizes)
            if cuda_graph_sizes is None:
                self._keep_graphs_that_pay()
        self._check_prefill()

    def _make_decode_attention(self, max_context: int, on_cuda: bool) -> int:
        """Set up decode attention; returns the cache length per slot it needs."""
        if self.attention == "sdpa":
            self._decode_attention = SdpaDecode(self._heads, self._kv_heads, self._head_dim, self._scale)
            return max_context
        if self.attention != "flex":
            raise ValueError(f"attention {self.attention!r} is not one of sdpa, flex")
        context = cache_length(max_context, "flex")
        tuned = on_cuda and torch.cuda.get_device_capability(self.device) >= (9, 0)
        self._decode_attention = FlexDecode(self.slots, context, self._heads, self._head_dim, self._scale,
                                            self.device, self.dtype, compile=on_cuda,
                                            kernel_options=FLEX_DECODE_OPTIONS_SM90 if tuned else None)
        return context

    def release(self, slot: int) -> None:
        """Nothing to free: a slot's old keys sit past the next owner's length and are masked."""

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of one slot's keys and values into another's,
        every layer at once (a request that shares a running request's prefix)."""
        self.keys[:, target, :, :length].copy_(self.keys[:, source, :, :length])
        self.values[:, target, :, :length].copy_(self.values[:, source, :, :length])

    # Reads chunks' tokens from the previous step's sampled tokens on the device, so the
    # engine can queue step N+1 before it has read step N's tokens.
    supports_overlap = True

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], previous: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Chunk]]:
        """Logits [rows, vocab] and the chunk each row belongs to (a chunk with several
        logit offsets has several rows, in offset order).

        previous: the last step's sampled tokens, for chunks with from_previous set.
        """
        if self._graphs and all(len(c.token_ids) == 1 for c in chunks):
            wanted = [c for c in chunks if c.logit_rows()]
            return self._replay(chunks, wanted, previous), wanted
        batch = _StepBatch(chunks, self.slots, self.device, previous, pack_prompts=self._varlen is not None)
        return self._forward_batch(batch).float(), batch.logit_chunks

    def _forward_batch(self, batch: _StepBatch) -> torch.Tensor:
        hidden = self._body.embed_tokens(batch.token_ids)[None]
        cos, sin = self._body.rotary_emb(hidden, batch.positions[None])
        if batch.num_decodes:
            self._decode_attention.prepare(batch)
        # cuDNN attention builds a plan for every new prompt-piece shape: measured at
        # ~1.9 ms of host time per call on an H100, 100x its 19 us kernel.
        with sdpa_kernel(PREFILL_BACKENDS):
            for index, layer in enumerate(self._layers):
                hidden = self._layer(index, layer, hidden, cos, sin, batch)
        last = hidden[0, batch.logit_rows]
        return self._model.lm_head(self._body.norm(last))

    def _layer(self, index: int, layer: Any, hidden: torch.Tensor, cos, sin, batch: _StepBatch) -> torch.Tensor:
        project, finish = self._dense_parts(batch)
        q, k, v = project(layer, hidden, cos, sin)
        keys, values = self.keys[index], self.values[index]
        new_keys = k[0].transpose(0, 1)  # [tokens, kv_heads, head_dim], as the cache holds them
        keys[batch.slots, :, batch.positions] = new_keys
        values[batch.slots, :, batch.positions] = v[0]
        out = self._attend(q[0].transpose(0, 1), keys, values, batch, new_keys, v[0])
        return finish(layer, hidden, out)

    def _dense_parts(self, batch: _StepBatch):
        """The layer's work around attention, compiled (fused norms, rotary, SiLU): for the
        shape of the decode graph over every slot, and once more for any token count, for
        steps that carry prompt pieces (unfused, their elementwise kernels took half of such a
        step's GPU time) and for the smaller decode graphs, which so cost no compile of their own."""
        if batch.decode_all_slots and self._compiled is not None:
            return self._compiled
        if self._compiled_any_shape is not None:
            return self._compiled_any_shape
        return self._project, self._finish

    def _project(self, layer: Any, hidden: torch.Tensor, cos, sin):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        tokens = x.shape[1]
        if self._qkv_sizes:
            q, k, v = F.linear(x, attention.fused_qkv, attention.fused_qkv_bias).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        q = q.view(1, tokens, self._heads, self._head_dim)
        k = k.view(1, tokens, self._kv_heads, self._head_dim)
        v = v.view(1, tokens, self._kv_heads, self._head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head before rotating it
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v

    def _finish(self, layer: Any, hidden: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        hidden = hidden + layer.self_attn.o_proj(attention_out.reshape(1, hidden.shape[1], -1))
        x = layer.post_attention_layernorm(hidden)
        if not self._qkv_sizes:
            return hidden + layer.mlp(x)
        gate, up = F.linear(x, layer.mlp.fused_gate_up).chunk(2, dim=-1)
        return hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: _StepBatch,
                new_keys: torch.Tensor, new_values: torch.Tensor) -> torch.Tensor:
        """Attention for every token of the step; q is [tokens, heads, head_dim]."""
        parts = []
        if batch.num_decodes:
            parts.append(self._decode_attention(q[:batch.num_decodes], keys, values, batch))
        if batch.packed is not None:
            # A whole prompt attends only to itself, so this step's keys are all it needs.
            begin, end, bounds, longest = batch.packed
            parts.append(self._varlen(q[begin:end], new_keys[begin:end], new_values[begin:end], bounds, longest,
                                      self._scale))
        for chunk, begin in zip(batch.prefills, batch.prefill_offsets):
            end = begin + len(chunk.token_ids)
            parts.append(self._attend_prefill(q[begin:end], keys[chunk.slot], values[chunk.slot], chunk))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _attend_prefill(self, q, keys, values, chunk: Chunk) -> torch.Tensor:
        end = chunk.start + len(chunk.token_ids)
        k, v = keys[None, :, :end], values[None, :, :end]
        q = q.transpose(0, 1)[None]
        if chunk.start == 0:  # a whole prompt at once: plain causal, the fastest kernels apply
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale, enable_gqa=True)
        else:
            query_pos = torch.arange(chunk.start, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= query_pos[:, None]
            grouped = {"enable_gqa": True}
            if q.is_cuda:
                # No GPU kernel takes both a mask and grouped heads: with enable_gqa this fell back
                # to the math path, ~0.6 ms of host time per layer (measured on an H200).
                (k, v), grouped = _one_kv_head_per_query_head(k, v, self._heads // self._kv_heads), {}
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self._scale, **grouped)
        return out[0].transpose(0, 1)

    # -- CUDA graph for pure decode steps ---------------------------------------------

    def _compile_dense_parts(self):
        import torch._dynamo

        # One compiled graph per layer (each layer's weights are guarded), all of
        # the same code, so inductor's cache compiles the kernels once.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * len(self._layers)))
        fixed = (torch.compile(self._project, dynamic=False), torch.compile(self._finish, dynamic=False))
        return fixed, (torch.compile(self._project, dynamic=True), torch.compile(self._finish, dynamic=True))

    def _check_prefill(self) -> None:
        """Run a throwaway prompt through the prefill path at start: it compiles the any-shape
        layers now rather than at the first request, and proves this torch's varlen kernel
        takes the call. What fails is turned off (varlen first, then the compiled layers) and
        logged, so a worker starts on a slower path rather than failing every prompt."""
        if self._compiled_any_shape is None and self._varlen is None:
            return
        while True:
            try:
                with torch.inference_mode():
                    # Two lengths, so the compiler sees the token count vary; slot 0's first
                    # owner overwrites what this writes.
                    for length in sorted({min(17, self._scratch_position), min(40, self._scratch_position)}):
                        self._forward_batch(_StepBatch([Chunk(0, [0] * length, 0)], self.slots, self.device,
                                                       pack_prompts=self._varlen is not None))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # a kernel's failure shows here
                return
            except Exception:
                if self._varlen is not None:
                    log.exception("varlen attention failed on this torch; prompts attend one call each")
                    self._varlen = None
                elif self._compiled_any_shape is not None:
                    log.exception("compiling the prefill layers failed; steps with prompt pieces run them uncompiled")
                    self._compiled_any_shape = None
                else:
                    raise

    def _capture_with_fallback(self, sizes: tuple[int, ...]) -> None:
        try:
            self._capture_decode_graphs(sizes)
        except Exception:
            if self._compiled is None:
                raise
            # A compiler failure must not stop a worker: the uncompiled graph is correct, only slower.
            log.exception("compiling the decode layers failed; capturing the decode graphs without it")
            self._compiled = self._compiled_any_shape = None
            self._capture_decode_graphs(sizes)

    def _capture_decode_graphs(self, sizes: tuple[int, ...]) -> None:
        """One graph per size, largest first, all in one memory pool: only one replays at a
        time, so their intermediate tensors can share memory."""
        self._decode_attention.lengths.zero_()
        graphs, pool = [], None
        with torch.inference_mode():
            for rows in sorted(sizes, reverse=True):
                graph = _DecodeGraph(rows, self.slots, self._scratch_position, self.device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up compiles flex and sets up cuBLAS outside the capture
                    for _ in range(2):
                        self._forward_batch(graph.batch)
                torch.cuda.current_stream().wait_stream(side)
                graph.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph.graph, pool=pool):
                    graph.logits = self._forward_batch(graph.batch)
                pool = graph.graph.pool()
                graphs.append(graph)
        self._graphs = graphs[::-1]
        log.info("decode CUDA graphs captured for %s decoding requests", ", ".join(str(g.rows) for g in self._graphs))

    def _keep_graphs_that_pay(self) -> None:
        """Drop the smaller graphs that replay no faster than the graph over every slot.

        Whether rows cost time depends on the model and the GPU: on an H200 a Qwen3-0.6B
        step costs about the same for 8 rows as for 256 (its ~400 kernels are bound by
        launch and latency), and a smaller graph's extra work (placing rows in their slots'
        places) made it slower; a Llama-3-8B step over 8 rows took 17-18% less time than over
        256. So each graph is timed here, with no request live (the attention reads
        nothing; what differs between graphs is the dense work), and kept only if it wins."""
        replay_ms = {graph.rows: _replay_ms(graph) for graph in self._graphs}
        kept = set(graphs_worth_keeping(replay_ms, self.slots))
        self._graphs = [graph for graph in self._graphs if graph.rows in kept]
        log.info("decode CUDA graphs kept for %s decoding requests (ms per replay with none live: %s)",
                 ", ".join(str(g.rows) for g in self._graphs),
                 ", ".join(f"{rows}: {ms:.2f}" for rows, ms in sorted(replay_ms.items())))

    def _replay(self, chunks: list[Chunk], wanted: list[Chunk], previous: torch.Tensor | None) -> torch.Tensor:
        graph = next(g for g in self._graphs if g.rows >= len(chunks))
        row_of, slot_of_row = graph.assign(chunks)
        ids = [0] * graph.rows
        positions = [self._scratch_position] * graph.rows
        lengths = [0] * self.slots
        for chunk in chunks:
            row = row_of[chunk.slot]
            ids[row], positions[row], lengths[chunk.slot] = chunk.token_ids[0], chunk.start, chunk.start + 1
        # One copy for everything the graph reads: the inputs, each row's slot, the logit
        # rows, and where tokens still on the device go.
        carried = [c for c in chunks if c.from_previous is not None]
        logit_rows = [row_of[c.slot] for c in wanted]
        staged = to_device(ids + positions + lengths + slot_of_row + logit_rows + [row_of[c.slot] for c in carried]
                           + [c.from_previous for c in carried], torch.long, self.device)
        rows, slots = graph.rows, self.slots
        graph.batch.token_ids.copy_(staged[:rows])
        graph.batch.positions.copy_(staged[rows:2 * rows])
        self._decode_attention.lengths.copy_(staged[2 * rows:2 * rows + slots])
        rest = staged[2 * rows + slots:]
        if slot_of_row:
            graph.batch.slots.copy_(rest[:rows])
            rest = rest[rows:]
        if carried:
            into, taken = rest[len(logit_rows):len(logit_rows) + len(carried)], rest[len(logit_rows) + len(carried):]
            graph.batch.token_ids.index_copy_(0, into, previous.index_select(0, taken))
        graph.graph.replay()
        return graph.logits[rest[:len(logit_rows)]].float()


def decode_graph_sizes(slots: int) -> tuple[int, ...]:
    """Decoding requests per step that get a CUDA graph: powers of two from 8, and all slots.

    A step replays the smallest graph that holds its decoding requests, so a worker with a
    few live requests does not run the dense products and the LM head for all its slots.
    Under 8 rows a product costs what 8 cost (it is bound by reading its weights), so
    smaller graphs would add capture time and memory for nothing.
    """
    return (*(2 ** power for power in range(3, slots.bit_length()) if 2 ** power < slots), slots)


def graphs_worth_keeping(replay_ms: dict[int, float], slots: int, margin: float = 0.03) -> list[int]:
    """The graph sizes worth replaying, from each graph's time per replay: the graph over
    every slot, and each smaller one that is at least `margin` faster than it (closer
    than that is within the timing's noise, and the smaller graph would be a wash)."""
    full = replay_ms[slots]
    return sorted(rows for rows, ms in replay_ms.items() if rows == slots or ms <= full * (1 - margin))


def _replay_ms(graph: _DecodeGraph, repeats: int = 20) -> float:
    graph.graph.replay()  # the first replay after a capture uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _check_graph_sizes(sizes: tuple[int, ...], slots: int) -> tuple[int, ...]:
    if any(size < 1 or size > slots for size in sizes):
        raise ValueError(f"CUDA graph sizes {sizes} must lie between 1 and the {slots} slots")
    # Every step must find a graph that holds it: the largest always covers every slot.
    return tuple(sorted(set(sizes) | {slots}))


class _DecodeGraph:
    """A decode step over a fixed number of rows, captured once and replayed.

    The graph over every slot reads row i as slot i. A smaller one reads each row's slot
    from its batch (`batch.slots`): the decoding requests' slots first, then idle slots, one
    each, which write a throwaway key at the spare position and attend to nothing."""

    def __init__(self, rows: int, slots: int, scratch_position: int, device: torch.device):
        self.rows, self._slots = rows, slots
        self.batch = _StepBatch.static_decode(rows, slots, device)
        self.batch.positions.fill_(scratch_position)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def assign(self, chunks: list[Chunk]) -> tuple[dict[int, int], list[int]]:
        """The row of each chunk's slot, and the slot of every row (empty where row i is slot i)."""
        if self.rows == self._slots:
            return {c.slot: c.slot for c in chunks}, []
        busy = {c.slot for c in chunks}
        idle = [slot for slot in range(self._slots) if slot not in busy][:self.rows - len(chunks)]
        return {c.slot: row for row, c in enumerate(chunks)}, [c.slot for c in chunks] + idle


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
        if not all(type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor for m in linears):
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
            attention.register_buffer("fused_qkv", qkv, persistent=False)
            attention.register_buffer("fused_qkv_bias", bias, persistent=False)
            mlp.register_buffer("fused_gate_up", gate_up, persistent=False)
    return sizes


def _one_kv_head_per_query_head(k: torch.Tensor, v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values repeated along the head axis (1) for kernels that take no grouped heads."""
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _varlen_attention(kv_heads: int, heads: int):
    """torch's variable-length flash attention as causal(q, k, v, bounds, longest, scale),
    or None where this torch has none. Its keyword arguments changed between releases."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepted = inspect.signature(varlen_attn).parameters
    options = {}
    if "is_causal" in accepted:
        options["is_causal"] = True
    elif "window_size" in accepted:
        options["window_size"] = (-1, 0)
    else:
        return None
    grouped = "enable_gqa" in accepted
    if grouped:
        options["enable_gqa"] = True
    group = heads // kv_heads

    def causal(q, k, v, bounds, longest: int, scale: float) -> torch.Tensor:
        if not grouped:
            k, v = _one_kv_head_per_query_head(k, v, group)
        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), bounds, bounds, longest, longest,
                           scale=scale, **options)

    log.info("prefill: whole prompts share one varlen flash attention call per layer (%s)",
             ", ".join(f"{k}={v}" for k, v in options.items()))
    return causal


class _StepBatch:
    """One step's chunks flattened into token, position and slot tensors."""

    decode_all_slots = False
    slot_lengths: torch.Tensor | None = None  # each slot's attended length, for decode steps

    def __init__(self, chunks: list[Chunk], slots: int, device: torch.device, previous: torch.Tensor | None = None,
                 pack_prompts: bool = False):
        # Decodes first, ordered by slot, so their attention can read one slice of the cache.
        # A one-token prompt piece attends exactly like a decode, so it joins them. With
        # pack_prompts, whole prompts (start 0) come next, for one varlen attention call;
        # the rest attend one by one.
        decodes = sorted((c for c in chunks if len(c.token_ids) == 1), key=lambda c: c.slot)
        decode_ids = {id(c) for c in decodes}
        pieces = [c for c in chunks if id(c) not in decode_ids]
        whole = [c for c in pieces if c.start == 0] if pack_prompts else []
        self.prefills = [c for c in pieces if not (pack_prompts and c.start == 0)]
        self.order = decodes + whole + self.prefills
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
        self.prefill_offsets = offsets[self.num_decodes + len(whole):]
        self.packed = None  # (first token, end, cumulative lengths on the device, longest)
        if whole:
            lengths = [len(c.token_ids) for c in whole]
            bounds = [0, *itertools.accumulate(lengths)]
            begin = offsets[self.num_decodes]
            self.packed = (begin, begin + bounds[-1], to_device(bounds, torch.int32, device), max(lengths))
        carried = [(offset, c.from_previous) for offset, c in zip(offsets, self.order) if c.from_previous is not None]
        tokens = len(token_ids)
        staged = to_device(token_ids + positions + slot_of + logit_rows + [o for o, _ in carried]
                           + [r for _, r in carried], torch.long, device)
        self.token_ids, self.positions, self.slots = staged[:tokens], staged[tokens:2 * tokens], staged[2 * tokens:3 * tokens]
        self.logit_rows = staged[3 * tokens:3 * tokens + len(logit_rows)]
        if carried:
            rest = staged[3 * tokens + len(logit_rows):]
            self.token_ids.index_copy_(0, rest[:len(carried)], previous.index_select(0, rest[len(carried):]))
        if decodes:
            self._decode_views(decodes, slots, device)

    def _decode_views(self, decodes: list[Chunk], slots: int, device: torch.device) -> None:
        lengths = [c.start + 1 for c in decodes]
        self.decode_max_len = max(lengths)
        slot_ids = [c.slot for c in decodes]
        contiguous = slot_ids == list(range(slot_ids[0], slot_ids[0] + len(slot_ids)))
        self.decode_slot_range = (slot_ids[0], slot_ids[-1] + 1) if contiguous else None
        per_slot = [0] * slots
        for slot, length in zip(slot_ids, lengths):
            per_slot[slot] = length
        staged = to_device(slot_ids + lengths + per_slot, torch.long, device)
        count = len(slot_ids)
        self.decode_slots, lengths_t = staged[:count], staged[count:2 * count]
        self.decode_mask = (torch.arange(self.decode_max_len, device=device)[None, :] < lengths_t[:, None])[:, None, None, :]
        self.slot_lengths = staged[2 * count:].to(torch.int32)

    @classmethod
    def static_decode(cls, rows: int, slots: int, device: torch.device) -> _StepBatch:
        """Static buffers for a decode step of `rows` one-token rows, for a CUDA graph to read.
        Over every slot, row i is slot i; otherwise `slots` says each row's slot. The decode
        attention's lengths are set in place before each replay (slot_lengths stays None)."""
        batch = cls.__new__(cls)
        batch.decode_all_slots = rows == slots
        batch.prefills, batch.prefill_offsets, batch.packed = [], [], None
        batch.num_decodes = rows
        batch.token_ids = torch.zeros(rows, dtype=torch.long, device=device)
        batch.positions = torch.zeros(rows, dtype=torch.long, device=device)
        batch.slots = batch.decode_slots = torch.arange(rows, device=device)
        batch.logit_rows = torch.arange(rows, device=device)
        return batch


class GenericRunner:
    """Any causal LM: one forward per chunk, each slot with its own DynamicCache."""

    supports_overlap = False  # each chunk's tokens go in from the host

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
