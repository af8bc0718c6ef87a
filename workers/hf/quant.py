"""Float8 weights that make decoding faster: `--quantize fp8`.

Decoding at low concurrency reads every weight once per step, so a step is bound by
those bytes: an 8B model's 16 GB of bf16 take ~3.8 ms at an H200's copy bandwidth,
whatever the batch. Weights in float8 (e4m3) halve the bytes, but only if the product
reads them as float8. torch's scaled matrix product (`torch._scaled_mm`, cuBLASLt's
fp8 kernels on compute capability 8.9 and newer; also implemented on CPU) does that
when both operands are float8, so each product quantizes its activations too: one
scale per row (token), computed from the row's largest magnitude. Under the compiled
decode step inductor fuses that quantization into the kernel that produces the
activations (the norm or the SiLU product before it); a probe on one Llama-3-8B layer
with separate quantizing kernels took 0.187 ms against bf16's 0.120 ms, so this path is
worth offering only where the layers are compiled.

The row's scale is applied after the product, not by cuBLASLt's row-wise kernel: the
tensor-wise kernel (with unit scales) is the fast one at decode sizes, and the scales
multiply its float32 output in the kernel that follows. Measured on an H100
(benchmarks/quantized_gpu.py, Llama-3-8B shape, compiled and graph-captured step, bf16
in the same run, docs/contrast-and-weights.md): 1.36-1.37x bf16's decode tok/s at 1-8
live requests and 1.13x at 256; one scale per step was 1.29-1.30x (its step-wide maximum
takes two kernels of its own before each product) and the row-wise kernel 1.18x.

A weight-only Triton kernel for steps of 1-16 rows (fp8_matvec.py: activations
unquantized, the weight widened in registers) is faster than bf16 alone (1.45x on one
layer's products at 8 rows) but not inside the compiled step: there its products took
5.1 ms a step against 3.2 ms for cuBLASLt's float8 kernels (H100, step_kernels.py), so
FEW_ROWS_KERNEL keeps it off.

Weights get one scale per output channel, so fusing q/k/v or gate/up (runner.py) is a
plain concatenation of weights and scales. The output head stays in the model's dtype:
its rounding would move every logit, and tied models share it with the embedding.

This is written over torch's own kernel rather than through torchao's float8
configurations because torchao's quantized tensors are opaque to the runner's
projection fusion (7 products per layer instead of 4); benchmarks/quantized_gpu.py can
run both (`fp8_torchao`), but that comparison has not been run on a GPU yet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import fp8_matvec

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A row of zeros (padding) must not divide by zero; any positive floor will do, as its
# quantized values are all zero.
_MIN_SCALE = 1e-12


def fp8_supported(device: torch.device, flag: str = "--quantize fp8") -> str | None:
    """None where `--quantize fp8` (or `--kv-dtype fp8`) runs, else why not, in words a user can act on."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            instead = "--quantize none or int8" if flag.startswith("--quantize") else "--kv-dtype auto"
            return (f"{flag} needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use {instead}")
    return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, features] as float8 with one float32 scale per row: x ~= q * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# How activations are scaled on their way into the float8 product.
#   "tensor": one scale for the whole step's activations (vLLM's default for dynamic fp8).
#     cuBLASLt's tensor-wise kernel reads it; the weights' per-channel scales are applied
#     to the product's output, a pointwise multiply inductor fuses into what follows. A
#     row's rounding then depends on the largest activation in the step, so output is not
#     batch-invariant, and the step-wide maximum is a reduction over every row: inductor
#     splits it into two kernels of its own before each product (profiled on an H100:
#     ~0.6 ms of a 5.5 ms Llama-3-8B step).
#   "row": one scale per row (token), batch-invariant. The row's maximum is a reduction over
#     that row only, which inductor fuses into the kernel that makes the row (the norm, the
#     SiLU product), quantizing in the same pass. The product runs through the same
#     tensor-wise kernel with unit scales, and both scales are applied to its float32
#     output, fused into what follows.
#   "row_kernel": one scale per row through cuBLASLt's row-wise kernel, which applies them
#     itself; slower than bf16's at a handful of rows (H200 probe, norm and a 4096x6144
#     product at 8 rows: 22.5 us against 14.4 us tensor-wise and 19.6 us bf16).
ACTIVATION_SCALES = "row"


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float8 with one float32 scale for all of it: x ~= q * scale."""
    scale = x.abs().amax().float().clamp(min=_MIN_SCALE) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# What products of 1 to fp8_matvec.MAX_ROWS rows run on a GPU that has the kernel.
#   "scaled_mm": torch._scaled_mm, as for larger products (measured faster in the step).
#   "weight_only": fp8_matvec's kernel, activations unquantized (ACTIVATION_SCALES unused).
FEW_ROWS_KERNEL = "scaled_mm"


# cuBLASLt's tensor-wise product takes its scales as tensors. One 1.0 per device, made
# outside any compiled graph: made inside, it would be a kernel of its own before every
# product (128 a Llama-3-8B step).
_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def unit_scale(device: torch.device) -> torch.Tensor:
    """A float32 1.0 on `device`, made once (by Fp8Linear, outside any compiled graph)."""
    if device not in _UNIT_SCALES:
        _UNIT_SCALES[device] = torch.ones((), dtype=torch.float32, device=device)
    return _UNIT_SCALES[device]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight * weight_scale[:, None], bias) with float8 weight [out, in] and
    its per-output-channel scale [out]. A few rows on a GPU take the weight-only kernel
    (FEW_ROWS_KERNEL); otherwise x is quantized on the way in (ACTIVATION_SCALES)."""
    rows = x.reshape(-1, x.shape[-1])
    if FEW_ROWS_KERNEL == "weight_only" and 0 < rows.shape[0] <= fp8_matvec.MAX_ROWS \
            and fp8_matvec.available(x.device):
        out = fp8_matvec.fp8_weight_only_linear(rows, weight, weight_scale, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if ACTIVATION_SCALES == "row_kernel":
        q, scale = quantize_rows(rows)
        # weight.t() of a row-major [out, in] is the column-major operand the kernel wants.
        out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale[None], bias=bias,
                               out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if rows.shape[0] == 0:  # amax of nothing is an error, and there is nothing to scale
        return x.new_zeros(*x.shape[:-1], weight.shape[0])
    q, scale = quantize_rows(rows) if ACTIVATION_SCALES == "row" else quantize_tensor(rows)
    # Only read here: a compiled step must not store a tensor it traced into the module's dict.
    unit = _UNIT_SCALES.get(x.device)
    if unit is None:  # weights not made by Fp8Linear on this device: a kernel, but correct
        unit = torch.ones((), dtype=torch.float32, device=x.device)
    out = torch._scaled_mm(q, weight.t(), scale_a=unit, scale_b=unit, out_dtype=torch.float32)
    out = out * scale * weight_scale  # scale: [rows, 1] or one for all
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(torch.nn.Module):
    """A Linear layer whose weight is held in float8 with one scale per output channel."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        unit_scale(weight.device)  # here, before any compiled step reads it

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        weight, scale = quantize_rows(linear.weight.data)  # a weight's rows are its output channels
        bias = None if linear.bias is None else linear.bias.data
        return cls(weight, scale.squeeze(1).contiguous(), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn"


def quantize_fp8_weights(model: Any) -> int:
    """Replace every Linear layer but the output head with an Fp8Linear; returns how many.
    The kernel needs both sizes of each product to be multiples of 16 (true of every
    model batchd serves); a layer that is not stays in the model's dtype."""
    head = model.get_output_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child is not head \
                    and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(parent, name, Fp8Linear.from_linear(child))
                replaced += 1
    return replaced


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The runner's fused products: float8 weights carry a scale, others are plain."""
    if weight_scale is None:
        return F.linear(x, weight, bias)
    return fp8_linear(x, weight, weight_scale, bias)
