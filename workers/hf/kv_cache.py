"""The paged KV cache's tensors: every layer's keys and values in one pool of fixed-size blocks.

Allocated once, at start. Position p of a request lives at physical position
`block_table[p // block_size] * block_size + p % block_size` of the flat token
axis; workers/hf/blocks.py decides which blocks a request holds. Token-major
([layers, tokens, kv_heads, head_dim]), as vLLM and FlashAttention keep theirs:
a write or a gather moves whole rows of kv_heads x head_dim, and attention
kernels take a strided [1, kv_heads, tokens, head_dim] view of it.

`--kv-dtype fp8` stores keys and values as float8 e4m3 (half of bf16's bytes: twice the
tokens in the same memory, and half the bytes a decode step's attention reads), each
layer's keys and values with one scale of their own, set at start from a calibration
pass (`calibrate`) so their largest magnitude lands at half of float8's range. Index
operations run on byte views (the CPU implements none for float8), reads for the prompt
path come back dequantized in the model's dtype, and the decode path reads float8 in
place (workers/hf/attention.py), values column-major as flex's float8 products take them.
"""

from __future__ import annotations

from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# --kv-dtype choices: "auto" stores the model's own dtype.
KV_DTYPES = {"auto": None, "fp8": FP8}

# Tokens a block holds on a GPU: flex attention's sparse block, so a block table is its KV
# block index. On a CPU smaller blocks waste less of a short request's last block.
GPU_BLOCK_SIZE = 128
CPU_BLOCK_SIZE = 16


def kv_dtype(name: str | None) -> torch.dtype | None:
    """The pool's storage dtype for a --kv-dtype name (None: the model's)."""
    try:
        return KV_DTYPES[name or "auto"]
    except KeyError:
        raise ValueError(f"kv_dtype {name!r} is not one of {', '.join(KV_DTYPES)}") from None


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
                 dtype: torch.dtype, device: torch.device, layout: str = "head", storage: torch.dtype | None = None):
        if layout not in ("head", "token"):
            raise ValueError(f"KV layout {layout!r} is not one of head, token")
        self.num_blocks, self.block_size, self.layout = num_blocks, block_size, layout
        self.dtype = dtype  # what reads return (the model's)
        self.quantized = storage == FP8
        if self.quantized and layout != "head":
            raise ValueError("--kv-dtype fp8 keeps the pool head-major (layout 'head')")
        storage = storage or dtype
        tokens = num_blocks * block_size
        shape = (layers, kv_heads, tokens, head_dim) if layout == "head" else (layers, tokens, kv_heads, head_dim)
        # Zeroed, not empty: positions no request owns still enter a padded attention product
        # (masked), and NaNs there would poison it.
        self.keys = torch.zeros(shape, dtype=storage, device=device)
        if self.quantized:
            # Column-major values (head_dim, then tokens, in memory): flex's float8 product
            # softmax @ v takes them so on compute capability 8.9-9.x; any other layout it
            # would copy, the whole pool, at every call.
            self.values = torch.zeros((layers, kv_heads, head_dim, tokens), dtype=storage,
                                      device=device).transpose(-1, -2)
        else:
            self.values = torch.zeros(shape, dtype=storage, device=device)
        self.bytes = 2 * self.keys.numel() * self.keys.element_size()
        self._token_axis = 1 if layout == "head" else 0  # within one layer
        # Each layer's scales: stored = value / scale. 1.0 until calibrated.
        self.key_scales = [1.0] * layers
        self.value_scales = [1.0] * layers
        self._calibration: dict[int, tuple[float, float]] | None = None
        # On a GPU the two quantizations of a write are one fused kernel (eager: six, 28 layers
        # a step: +0.3 ms on a Qwen3-0.6B decode step, measured on an H200).
        self._quantize = _quantize_pair
        if self.quantized and torch.device(device).type == "cuda":
            self._quantize = torch.compile(_quantize_pair, dynamic=True)

    def write(self, layer: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a step's new keys and values ([tokens, kv_heads, head_dim]) at physical positions."""
        if not self.quantized:
            self.store(self.layer(layer), index, keys, values)
            return
        if self.layout == "head":
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)
        if self._calibration is not None:
            seen = self._calibration.get(layer, (0.0, 0.0))
            self._calibration[layer] = (max(seen[0], float(keys.abs().max())), max(seen[1], float(values.abs().max())))
        keys, values = self._quantize(keys, values, self.key_scales[layer], self.value_scales[layer])
        self.keys[layer].view(torch.uint8).index_copy_(self._token_axis, index, keys.view(torch.uint8))
        self.values[layer].view(torch.uint8).index_copy_(self._token_axis, index, values.view(torch.uint8))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values: views of the pool, for `store`."""
        return self.keys[layer], self.values[layer]

    def store(self, layer_kv: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """`write` for a pool in the model's dtype, in operations the compiler traces: the
        compiled projection calls it, so the transposes and copies of a layer's new keys and
        values fuse into the kernels that make them (two kernels a layer fewer, each a launch
        inside the decode graph).

        layer_kv is `layer(i)`, passed in rather than indexed here: a compiled caller then
        sees the layer's views as its own inputs and writes them in place. Indexed inside the
        graph, the compiler wrote the update back as a copy of the whole pool, at every call
        (236 ms a call for a 2 GiB pool on a CPU). A float8 pool's write calibrates and keeps
        Python floats, so it stays outside (`stores_in_projection`)."""
        if self.layout == "head":
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)
        layer_keys, layer_values = layer_kv
        layer_keys.index_copy_(self._token_axis, index, keys)
        layer_values.index_copy_(self._token_axis, index, values)

    @property
    def stores_in_projection(self) -> bool:
        return not self.quantized

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at physical positions, [*index.shape, kv_heads, head_dim], contiguous,
        in the model's dtype.

        A head-major pool is indexed through a token-major view, so the gather writes the
        layout the varlen kernel reads: gathering [kv_heads, tokens, head_dim] and moving the
        axis after made the kernel's caller copy both again, every layer of every step that
        carries a prompt."""
        keys, values = self.keys[layer], self.values[layer]
        if self.layout == "head":
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)
        if self.quantized:
            keys = keys.view(torch.uint8)[index].view(FP8).to(self.dtype) * self.key_scales[layer]
            values = values.view(torch.uint8)[index].view(FP8).to(self.dtype) * self.value_scales[layer]
            return keys, values
        return keys[index], values[index]

    def calibrating(self) -> "KVPool":
        """Record each layer's largest key and value magnitudes while the caller runs a
        calibration pass (`with pool.calibrating(): ...`); at the end, set the scales so that
        magnitude lands at half of float8's range (headroom for text the pass did not see;
        beyond it values saturate, never overflow)."""
        return _Calibration(self)

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
            pool = pool.view(torch.uint8) if self.quantized else pool
            pool.index_copy_(axis, target_index, pool.index_select(axis, source_index))


def to_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8 e4m3, saturating at its largest magnitude (a cast alone gives NaN there)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _quantize_pair(keys: torch.Tensor, values: torch.Tensor, key_scale: float,
                   value_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return to_fp8(keys, key_scale), to_fp8(values, value_scale)


class _Calibration:
    def __init__(self, pool: KVPool):
        self._pool = pool

    def __enter__(self) -> KVPool:
        self._pool._calibration = {}
        return self._pool

    def __exit__(self, *exc) -> None:
        pool, seen = self._pool, self._pool._calibration
        pool._calibration = None
        if exc[0] is not None:
            return
        for layer, (keys, values) in seen.items():
            # A layer that saw only zeros keeps 1.0.
            pool.key_scales[layer] = keys / (FP8_MAX / 2) if keys > 0 else 1.0
            pool.value_scales[layer] = values / (FP8_MAX / 2) if values > 0 else 1.0


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the GPU.

    A plain copy from pageable memory synchronises the stream, which would stall the
    host until the step already running ends; a pinned, non-blocking copy just queues.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
