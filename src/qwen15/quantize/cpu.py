"""bf16 and fp32 matrices for generation on CPU (`pack_for_cpu`): decode on our AVX-512 kernel, prompts on oneDNN.

Decode multiplies a few rows by each matrix: bound by reading the weights. oneDNN's products at 1-15 rows read
them below the memory's bandwidth here, and at 8 rows slower than at 1 (bench/kernels.py), so where the AVX-512
kernels build (kernels.dense_kernel) a product of fewer than PREFILL_ROWS rows runs kernels.dense_linear on the
plain weight (bf16: vdpbf16ps, fp32 sums; fp32: fma), which reads each weight once for up to 8 rows; longer inputs
(prompts) run torch's F.linear (oneDNN / MKL). Without the kernels the weight is prepacked for oneDNN instead
(about 1.5x faster than a plain weight, which oneDNN reorders on every call; fp32: torch's default product uses one
thread for these shapes, oneDNN all). The transform changes the model in place and makes it inference-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen15.quantize import kernels
from qwen15.quantize.int8 import PREFILL_ROWS


class PackedLinear(nn.Module):
    """nn.Linear (bf16 or fp32, CPU) for generation: the AVX-512 dense kernel for decode where it runs, else the
    weight prepacked for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        w = linear.weight.detach()
        self.kernel = kernels.dense_kernel(w.dtype)
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
        if x2.shape[0] < PREFILL_ROWS and x.dtype == self.weight.dtype:
            y = kernels.dense_linear(x2.contiguous(), self.weight, self._bias32)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        how = "avx512 kernel for decode, oneDNN for prompts" if self.kernel else "onednn-packed"
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
