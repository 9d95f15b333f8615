"""Weight-only int8: every matrix as int8 with one fp32 scale per output row (symmetric, absmax).

Activations stay in the model's dtype between layers. On CPU with the AVX-512 kernels (`kernels.py`) a product of
a few rows (decode) reads the int8 weights once and multiplies them with the activations quantized to int8 per
block of 64 columns on the fly (VNNI int8 dot products, as llama.cpp's Q8_0); a long prompt (>= PREFILL_ROWS rows)
dequantizes the matrix to the activations' dtype once and runs one dense product (oneDNN), which is compute-bound
there anyway. Without the kernels, CPU falls back to torch's `aten._weight_int8pack_mm` (fp32 compute-bound)
and other devices to `linear(x, w.to(x.dtype)) * scale`. The embedding table is quantized the same way (rows
dequantized on lookup) and a tied output layer reads the same table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen15.quantize import kernels

PREFILL_ROWS = 16  # at this many rows a dense product on the dequantized matrix is faster than the kernel


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and fp32 scales [N] with weight ~= int8 * scale[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def use_kernels(weight: torch.Tensor, k: int, multiple: int) -> bool:
    return weight.device.type == "cpu" and k % multiple == 0 and kernels.library() is not None


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * scale).T + bias, with the weight kept in int8."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self._setup()

    def _setup(self) -> None:
        self.kernel = use_kernels(self.weight, self.in_features, 64)
        # what each path reads besides the weight: fp32 bias for the kernel, scales in the activation dtype
        # for torch's fallback (which wants them so)
        self._bias32 = None if self.bias is None else self.bias.detach().float().contiguous()
        self._scales_x = self.scales.to(self.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, s = quantize_rows(linear.weight)
        return cls(q, s, linear.bias, linear.weight.dtype)

    @classmethod
    def concat(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One module whose output is the concatenation of the parts' outputs (fused projections)."""
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return cls(
            torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts]), bias, parts[0].dtype
        )

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kernel and self.weight.is_cpu:
            return kernels.int8_dequantize(self.weight, self.scales, dtype)
        return (self.weight.to(torch.float32) * self.scales[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a frozen int8 base under LoRA training
            y = _Int8Matmul.apply(x, self.weight, self.scales.to(x.dtype))
            return y if self.bias is None else y + self.bias
        x2 = x.reshape(-1, self.in_features)
        fast = self.kernel and x.is_cpu and self.weight.is_cpu  # (a model moved after quantizing: not)
        if fast and x.dtype in (torch.bfloat16, torch.float32):
            if x2.shape[0] >= PREFILL_ROWS:
                y = F.linear(x2, self.dequantize(x.dtype), self.bias)
            else:
                y = kernels.int8_linear(x2.contiguous(), self.weight, self.scales, self._bias32, x.dtype)
            return y.view(*x.shape[:-1], self.out_features)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32, torch.float16):
            scales = self._scales_x if self._scales_x.dtype == x.dtype else self.scales.to(x.dtype)
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kernel = "avx512" if self.kernel else "torch"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, kernel={kernel}"


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
        self.register_buffer("scales", scales.float())
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        q, s = quantize_rows(emb.weight)
        return cls(q, s, emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32) * F.embedding(ids, self.scales[:, None])
        return rows.to(self.dtype)

    def as_linear(self) -> Int8Linear:
        """The tied output layer: an Int8Linear over this very table (no copy)."""
        out = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(out)
        out.out_features, out.in_features = self.weight.shape
        out.dtype = self.dtype
        out.register_buffer("weight", self.weight)
        out.register_buffer("scales", self.scales)
        out.bias = None
        out._setup()
        return out


def swap_linears(model: nn.Module, make, progress: str | None = None) -> None:
    """Replace every nn.Linear of the blocks by make(linear), in place; a LoRALinear keeps its adapter and gets
    make(itself) as its frozen base (`replace_base`). progress: a tqdm bar labelled so."""
    from tqdm import tqdm

    for block in tqdm(model.layers.values(), desc=progress, unit="layer", disable=progress is None):
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if hasattr(child, "replace_base"):
                    if child.base_layer is None:  # (not quantized or packed already)
                        child.replace_base(make)
                elif isinstance(child, nn.Linear):
                    setattr(parent, name, make(child))


def quantize_int8(model: nn.Module, *, embeddings: bool = True, progress: bool = False) -> nn.Module:
    """Quantize a Qwen model's matrices and embedding to int8 weight-only, in place; returns the model.
    embeddings=False: the block projections only (the embedding and output layer stay, as QLoRA keeps them)."""
    swap_linears(model, Int8Linear.from_linear, "int8" if progress else None)
    if not embeddings:
        model.quantization = "int8"
        return model
    tied = model.config.tie_word_embeddings and model.lm_head is not None and model.embed_tokens is not None
    if model.embed_tokens is not None and isinstance(model.embed_tokens, nn.Embedding):
        model.embed_tokens = Int8Embedding.from_embedding(model.embed_tokens)
    if tied and isinstance(model.embed_tokens, Int8Embedding):
        model.lm_head = model.embed_tokens.as_linear()
    elif isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.quantization = "int8"
    return model
