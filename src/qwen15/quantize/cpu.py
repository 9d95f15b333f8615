"""bf16 and fp32 matrices for generation on CPU (`pack_for_cpu`): decode on our kernels, prompts on oneDNN.

Decode multiplies a few rows by each matrix: bound by reading the weights. oneDNN's products at 1-32 rows read
them below the memory's bandwidth here, and at 8 rows slower than at 1 (bench/kernels.py), so where our kernels
build, the products of decode run on the plain weight, which they read once for all rows: bf16 on AMX tiles
(kernels.amx_linear, 2 to AMX_ROWS rows) where the CPU has them, else AVX-512 (kernels.dense_linear: dot products,
below WIDE_FROM rows; kernels.dense_wide_linear: each weight broadcast against 16 rows, up to WIDE_ROWS). Longer
inputs (prompts) run oneDNN: bf16 through torch's F.linear (so bit-identical to the plain model), fp32 called
directly (torch's fp32 product is MKL's, 2.3x slower on an AMD EPYC). Without the kernels the weight is prepacked
for oneDNN instead (about 1.5x faster than a plain weight, which oneDNN reorders on every call). The transform
changes the model in place and makes it inference-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen15.quantize import kernels

WIDE_FROM = 24  # rows from which kernels.dense_wide_linear beats dense_linear (bench/kernels.py)


class PackedLinear(nn.Module):
    """nn.Linear (bf16 or fp32, CPU) for generation: our AMX or AVX-512 kernel for decode where it runs, else the
    weight prepacked for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        w = linear.weight.detach()
        self.kernel = kernels.dense_kernel(w.dtype)
        self.amx = self.kernel and kernels.amx_fits(w)
        self.wide = self.kernel and (w.dtype == torch.float32 or self.in_features % 2 == 0)
        if self.kernel:
            self.register_buffer("weight", w.contiguous())
            self._bias32 = None if linear.bias is None else linear.bias.detach().float().contiguous()
        else:
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, 1))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        x2 = x.reshape(-1, self.in_features)
        rows, run = x2.shape[0], None
        if x.dtype == self.weight.dtype:
            # one row: AVX-512, as fast or a little faster (both read the weights at the memory's speed)
            if self.amx and 1 < rows <= kernels.AMX_ROWS:
                run = kernels.amx_linear
            elif rows < WIDE_FROM:
                run = kernels.dense_linear
            elif rows <= kernels.WIDE_ROWS and self.wide:
                run = kernels.dense_wide_linear
        if run is None:
            if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
                # oneDNN on the plain weight: 2.3x torch's fp32 product (MKL) at 32-512 rows on an AMD EPYC
                # (bench/RESULTS.md), within 10% of a prepacked copy, which would double the memory
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return F.linear(x, self.weight, self.bias)
        y = run(x2.contiguous(), self.weight, self._bias32)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        how = "onednn-packed"
        if self.kernel:
            how = f"{'amx' if self.amx else 'avx512'} kernel for decode, oneDNN for prompts"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


def can_pack_for_cpu(model: nn.Module) -> bool:
    p = next(model.parameters())
    return (
        p.device.type == "cpu"
        and p.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
    )


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Prepack a CPU bf16 or fp32 model's matrices (output layer included) for oneDNN, in place; other models
    (quantized ones, GPU ones) are returned unchanged. A tied output layer gets its own packed copy (the
    embedding lookup keeps the table)."""
    if not can_pack_for_cpu(model):
        return model
    from qwen15.quantize.int8 import swap_linears

    swap_linears(model, PackedLinear)  # (a LoRALinear: its frozen base is packed, the adapter stays)
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = PackedLinear(model.lm_head)
    return model
