"""Weight-only int4, group-wise: w = q * scale + min per group of `group_size` columns, q in 0..15 (asymmetric).

Storage per matrix [N, K]: `qweight` uint8 [N, K/2], two columns per byte in the layout of cpu_kernels.c (`pack`:
groups interleaved 16 at a time, so that one 64-byte load feeds 16 groups' dot products), `scales` and `mins` bf16
[N, K / group_size]. Group 64 costs 4.5 bits per weight (llama.cpp's Q4_0: 4.5 at group
32, without a minimum). Scale and min are rounded to bf16 before the weights are rounded to them, so q is the best
code for what is stored.

Compute as int8.py: the AVX-512 kernel for a few rows (activations quantized to int8 per group there, one scale per
group of columns), and a dequantized matrix + one dense product for long prompts; without the kernels (another
CPU, no compiler, CUDA) the matrix is dequantized on every call (correct, not fast).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qwen15.quantize import kernels
from qwen15.quantize.int8 import PREFILL_ROWS, swap_linears, use_kernels

DEFAULT_GROUP = 64


GROUPS = (32, 64, 128)


def group_for(k: int, group_size: int) -> int:
    """The group size used for K columns: group_size when it divides K, else the largest smaller one of 64, 32
    that does (Qwen shapes are multiples of 128; tiny test shapes may be multiples of 32 only)."""
    if group_size not in GROUPS:
        raise ValueError(f"int4 group size must be one of {GROUPS}, got {group_size}")
    for g in GROUPS[::-1]:
        if g <= group_size and k % g == 0:
            return g
    raise ValueError(f"int4 needs the input width to be a multiple of 32; got {k}")


def quantize_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 [N, K] in 0..15, scales and mins bf16 [N, K/group] with weight ~= q * scale + min."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    mins = lo.to(torch.bfloat16)
    scales = ((hi - mins.float()) / 15).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round((w - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15)
    return q.to(torch.uint8).view(n, k), scales, mins


@functools.lru_cache(maxsize=64)
def _columns(k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed byte of a row: the column of its low nibble and of its high nibble (cpu_kernels.c's
    layout: super-blocks of 16 groups, the last of R <= 16; in each, runs t of 4R bytes, bytes 4l..4l+3 holding
    group l's columns 4t..4t+3 low and 4(t + S/2).. high, S = group / 4)."""
    ng, s = k // group, group // 4
    byte = torch.arange(k // 2)
    sb = byte // (8 * group)  # 16 groups of group / 2 bytes per super-block
    r = torch.clamp(ng - sb * 16, max=16)
    within = byte - sb * 8 * group
    t, lane = within // (4 * r), within % (4 * r)
    g, b = sb * 16 + lane // 4, lane % 4
    lo = g * group + 4 * t + b
    return lo, lo + 4 * (s // 2)


def pack(q: torch.Tensor, group: int) -> torch.Tensor:
    """Codes uint8 [N, K] (groups of `group` columns) -> packed uint8 [N, K/2] in the kernel's layout."""
    lo, hi = _columns(q.shape[-1], group)
    lo, hi = lo.to(q.device), hi.to(q.device)
    return (q[..., lo] | (q[..., hi] << 4)).contiguous()


def unpack(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Packed uint8 [..., K/2] -> codes uint8 [..., K] (the inverse of `pack`)."""
    k = packed.shape[-1] * 2
    lo, hi = _columns(k, group)
    q = torch.empty(*packed.shape[:-1], k, dtype=torch.uint8, device=packed.device)
    q[..., lo.to(packed.device)] = packed & 15
    q[..., hi.to(packed.device)] = packed >> 4
    return q


def dequantize_rows(packed, scales, mins, dtype: torch.dtype) -> torch.Tensor:
    """Weights [..., K] in dtype from packed rows and their scales and mins (torch ops; any device)."""
    groups = scales.shape[-1]
    q = unpack(packed, packed.shape[-1] * 2 // groups).float()
    w = q.unflatten(-1, (groups, -1)) * scales.float()[..., None] + mins.float()[..., None]
    return w.flatten(-2).to(dtype)


class Int4Linear(nn.Module):
    """y = x @ (int4 weight, per-group scale and min).T + bias."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        self.group_size = self.in_features // scales.shape[1]
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self._setup()

    def _setup(self) -> None:
        self.kernel = use_kernels(self.qweight, self.in_features, self.group_size)
        self._bias32 = None if self.bias is None else self.bias.detach().float().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP) -> Int4Linear:
        g = group_for(linear.in_features, group_size)
        q, s, m = quantize_groups(linear.weight, g)
        return cls(pack(q, g), s, m, linear.bias, linear.weight.dtype)

    @classmethod
    def concat(cls, parts: list[Int4Linear]) -> Int4Linear:
        """One module whose output is the concatenation of the parts' outputs (fused projections)."""
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        cat = [torch.cat([getattr(p, n) for p in parts]) for n in ("qweight", "scales", "mins")]
        return cls(*cat, bias, parts[0].dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kernel and self.qweight.is_cpu:
            return kernels.int4_dequantize(self.qweight, self.scales, self.mins, self.group_size, dtype)
        return dequantize_rows(self.qweight, self.scales, self.mins, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        fast = self.kernel and x.is_cpu and self.qweight.is_cpu  # (a model moved after quantizing: not)
        if fast and x.dtype in (torch.bfloat16, torch.float32) and x2.shape[0] < PREFILL_ROWS:
            y = kernels.int4_linear(
                x2.contiguous(), self.qweight, self.scales, self.mins, self.group_size, self._bias32, x.dtype
            )
        else:
            y = F.linear(x2, self.dequantize(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "avx512" if self.kernel else "dequantize"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, "
            f"kernel={kernel}"
        )


class Int4Embedding(nn.Module):
    """An int4 embedding table (rows dequantized on lookup); `as_linear()` gives the tied output layer over it."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape[0], qweight.shape[1] * 2
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int = DEFAULT_GROUP) -> Int4Embedding:
        g = group_for(emb.embedding_dim, group_size)
        q, s, m = quantize_groups(emb.weight, g)
        return cls(pack(q, g), s, m, emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.qweight[ids], self.scales[ids], self.mins[ids], self.dtype)

    def as_linear(self) -> Int4Linear:
        """The tied output layer: an Int4Linear over this very table (no copy)."""
        out = Int4Linear.__new__(Int4Linear)
        nn.Module.__init__(out)
        out.out_features, out.in_features = self.num_embeddings, self.embedding_dim
        out.group_size = self.embedding_dim // self.scales.shape[1]
        out.dtype = self.dtype
        for name in ("qweight", "scales", "mins"):
            out.register_buffer(name, getattr(self, name))
        out.bias = None
        out._setup()
        return out


def quantize_int4(
    model: nn.Module, group_size: int = DEFAULT_GROUP, output_bits: int = 4, progress: bool = False
) -> nn.Module:
    """Quantize a Qwen model's block matrices to int4 weight-only (groups of group_size columns), in place;
    the embedding and output layer go to int4 too, or to int8 with output_bits=8. Returns the model."""
    from qwen15.quantize.int8 import Int8Embedding, Int8Linear

    if output_bits not in (4, 8):
        raise ValueError(f"output_bits must be 4 or 8, got {output_bits}")
    swap_linears(model, lambda lin: Int4Linear.from_linear(lin, group_size), "int4" if progress else None)
    tied = model.config.tie_word_embeddings and model.lm_head is not None and model.embed_tokens is not None
    if output_bits == 8:
        emb_cls, emb_make = Int8Embedding, Int8Embedding.from_embedding
        lin_make = Int8Linear.from_linear
    else:
        emb_cls = Int4Embedding
        emb_make = lambda e: Int4Embedding.from_embedding(e, group_size)  # noqa: E731
        lin_make = lambda lin: Int4Linear.from_linear(lin, group_size)  # noqa: E731
    if isinstance(model.embed_tokens, nn.Embedding):
        model.embed_tokens = emb_make(model.embed_tokens)
    if tied and isinstance(model.embed_tokens, emb_cls):
        model.lm_head = model.embed_tokens.as_linear()
    elif isinstance(model.lm_head, nn.Linear):
        model.lm_head = lin_make(model.lm_head)
    model.quantization = "int4"
    return model
