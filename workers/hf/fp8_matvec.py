"""Float8 weights times a few rows of bf16 (or fp16, float32) activations: a Triton kernel.

Decoding a handful of requests is bound by reading the weights, so float8 weights should
take half of bf16's time. `torch._scaled_mm` wants both operands in float8, and quantizing
the activations costs kernels of their own at every product (quant.py). Here only the
weight is float8: each weight byte is read once, widened to the activations' dtype in
registers, and the product accumulates in float32; one float32 scale per output channel
(and the bias) is applied at the end. out[M, N] = (x @ weight.float().T) * scale + bias.

Rows are padded to MAX_ROWS inside the kernel (the tensor cores' smallest tile), so one
program computes a BLOCK_N slice of outputs for every row. A skinny product (Llama's
4096x14336 down projection) has too few slices to fill the GPU, so SPLIT_K programs share
each slice's K range and add their partial sums into a zeroed float32 buffer with atomics:
no host sync and no allocation that depends on the chosen configuration, so the op is
captured whole in a CUDA graph. The order of those additions varies, so with SPLIT_K > 2
an output can differ in float32's last bit from run to run (two addends commute exactly).

Registered as `torch.ops.batchd.fp8_weight_only_linear` through torch.library.triton_op,
so inductor traces into the kernel inside the compiled decode step; without Triton (or
on a GPU older than compute capability 8.9, which has no float8 conversion) `available`
is False and quant.py keeps torch's scaled product.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton  # torch 2.6 and newer
except ImportError:  # a CPU install, or an older torch: quant.py's torch path serves every product
    triton = None

# The most rows that take this kernel: tl.dot's smallest row tile, so 1 to 16 rows cost one
# pass over the weight; larger steps stay with cuBLASLt's float8 kernels, made for them.
MAX_ROWS = 16


def available(device: torch.device) -> bool:
    """Whether products on `device` can take the kernel: CUDA, Triton, float8 conversion (8.9+)."""
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


if triton is not None:

    @triton.jit
    def _fp8_weight_only_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """out[:M, slice] (+)= x[:M] @ w[slice].T * scale[slice] (+ bias, from the first split)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        depth = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Split s takes chunks s, s + SPLIT_K, ...: every split gets the same number (+-1).
        for start in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            ks = start + depth
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            # [BLOCK_N, BLOCK_K] of the row-major [N, K] weight, each row's bytes contiguous.
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :],
                        mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
            # Float32 activations multiply in TF32 on a GPU: 10 mantissa bits, the weight has 3.
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if HAS_BIAS:
            if pid_k == 0:  # once per output, whatever SPLIT_K
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows[:, None] * N + cols[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask, sem="relaxed")

    # Tiles of 16-32 KB of weight per step keep enough bytes in flight per SM to reach HBM's
    # bandwidth; the larger take 8 warps (registers for the widened tile) and 3 stages (shared
    # memory). 20 configurations, each compiled and timed once per product and row count.
    # (The weight tile as the product's left operand, out.T = w @ x.T, was timed too and lost
    # on every Llama-3-8B product by 15-25%: benchmarks/results/fp8_configs_h100.json.)
    _TILES = ((32, 512, 4, 4), (64, 256, 4, 4), (128, 128, 4, 4), (64, 512, 8, 3), (128, 256, 8, 3))
    CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}, num_warps=warps, num_stages=stages)
               for n, k, warps, stages in _TILES for split in (1, 2, 4, 8)]
    # Keyed on the exact row count (at most MAX_ROWS); the engine's decode graphs use 8 and 16.
    # The buffer the splits add into is zeroed before each timed run, or tuning would sum them.
    _tuned_kernel = triton.autotune(CONFIGS, key=["M", "N", "K"], reset_to_zero=["out_ptr"])(_fp8_weight_only_kernel)

    def _run(kernel, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             **config) -> torch.Tensor:
        rows = x.contiguous()
        (m, k), n = rows.shape, weight.shape[0]
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        # Without a bias the kernel never reads bias_ptr; any pointer fills the slot.
        kernel[grid](rows, weight, scale, scale if bias is None else bias, out, m, n, k, rows.stride(0),
                     HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, **config)
        return out.to(x.dtype)

    @triton_op("batchd::fp8_weight_only_linear", mutates_args=())
    def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M <= MAX_ROWS, K] times float8 weight [N, K] with float32 scale [N] (+ bias [N]): [M, N] in x's dtype."""
        return _run(wrap_triton(_tuned_kernel), x, weight, scale, bias)

    def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               config: "triton.Config") -> torch.Tensor:
        """The same product with one given configuration, untuned: under Triton's interpreter
        (TRITON_INTERPRET=1, on the CPU) timing means nothing, and each configuration is a case."""
        return _run(_fp8_weight_only_kernel, x, weight, scale, bias, num_warps=config.num_warps,
                    num_stages=config.num_stages, **config.kwargs)
