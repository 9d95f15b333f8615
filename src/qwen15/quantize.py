"""Inference weight formats: weight-only int8, and bf16 matrices prepacked for oneDNN on CPU.

Weight-only int8 quantization: every matrix stored as int8 with one scale per output row (symmetric, absmax).

Activations stay in the model's dtype. On CPU the product runs in PyTorch's int8 weight-packed matmul
(`aten._weight_int8pack_mm`), which reads the int8 weights directly; elsewhere it is `linear(x, w.to(x.dtype)) *
scale`, which torch.compile fuses into one kernel. The embedding table is quantized the same way (rows are
dequantized on lookup); a tied output layer shares it, so the weights take about half the memory of bf16. Norms
and the q/k/v biases stay in the original dtype.

CPU bf16 prepacking (`pack_for_cpu`): a bf16 matrix-vector product through oneDNN is about 1.5x faster on a
weight already reordered into oneDNN's blocked layout than on a plain tensor, which it would reorder on every
call; outputs are bit-identical. Both transforms change the model in place and make it inference-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and fp32 scales [N] with weight ~= int8 * scale[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * scale).T + bias, with the weight kept in int8."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, s = quantize_rows(linear.weight)
        return cls(q, s, linear.bias, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a frozen int8 base under LoRA training
            y = _Int8Matmul.apply(x, self.weight, self.scales)
        elif x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32, torch.float16):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class _Int8Matmul(torch.autograd.Function):
    """x @ (int8 weight * scale).T whose backward dequantizes the weight again instead of keeping a dequantized
    copy from the forward (which would hold the whole model in the compute dtype until backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scales)
        return F.linear(x, weight.to(x.dtype)) * scales

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scales = ctx.saved_tensors
        return (grad * scales.to(grad.dtype)) @ weight.to(grad.dtype), None, None


class Int8Embedding(nn.Module):
    """An embedding table in int8 with a scale per row; `as_linear()` gives the tied output layer over it."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(dtype))
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        q, s = quantize_rows(emb.weight)
        return cls(q, s, emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype) * F.embedding(ids, self.scales[:, None])

    def as_linear(self) -> Int8Linear:
        out = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(out)
        out.out_features, out.in_features = self.weight.shape
        out.register_buffer("weight", self.weight)
        out.register_buffer("scales", self.scales)
        out.bias = None
        return out


def quantize_int8(model: nn.Module, *, embeddings: bool = True) -> nn.Module:
    """Quantize a Qwen model's matrices and embedding to int8 weight-only, in place; returns the model.
    embeddings=False: the block projections only (the embedding and output layer stay, as QLoRA keeps them)."""
    for block in model.layers.values():
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if hasattr(child, "replace_base"):  # LoRA: the frozen base goes int8, the adapter stays
                    child.replace_base(Int8Linear.from_linear)
                elif isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
    if embeddings:
        tied = (
            model.config.tie_word_embeddings and model.lm_head is not None and model.embed_tokens is not None
        )
        if model.embed_tokens is not None and isinstance(model.embed_tokens, nn.Embedding):
            model.embed_tokens = Int8Embedding.from_embedding(model.embed_tokens)
        if tied and isinstance(model.embed_tokens, Int8Embedding):
            model.lm_head = model.embed_tokens.as_linear()
        elif isinstance(model.lm_head, nn.Linear):
            model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.quantization = "int8"
    return model


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
    are returned unchanged. bf16: a plain weight is reordered by oneDNN on every call; fp32: torch's default
    matrix-vector product uses one thread for these shapes here, oneDNN's uses all of them (bench/RESULTS.md). A tied output layer gets its own packed copy (the embedding lookup keeps the table)."""
    if not can_pack_for_cpu(model):
        return model
    for block in model.layers.values():
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if hasattr(child, "replace_base"):  # LoRA: the frozen base is packed, the adapter stays
                    child.replace_base(PackedLinear)
                elif isinstance(child, nn.Linear):
                    setattr(parent, name, PackedLinear(child))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = PackedLinear(model.lm_head)
    return model


def weight_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_mkldnn else (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
