"""bf16 and fp32 matrices prepacked for oneDNN on CPU (`pack_for_cpu`).

A bf16 matrix-vector product through oneDNN is about 1.5x faster on a weight already reordered into oneDNN's
blocked layout than on a plain tensor, which it would reorder on every call; outputs are bit-identical. fp32:
torch's default matrix-vector product uses one thread for these shapes here, oneDNN's uses all of them
(bench/RESULTS.md). The transform changes the model in place and makes it inference-only.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """nn.Linear with its weight (bf16 or fp32) prepacked for oneDNN (CPU only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn-packed"


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
