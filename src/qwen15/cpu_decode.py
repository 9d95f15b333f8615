"""Decode steps on CPU with the small operations fused: blocks and norms swapped in from outside the model.

A batch-1 decode step of the 0.5B shape spent ~7-13 ms (of ~38 with int8 weights) in ~40 eager torch operations
per layer around the matrix products: RMSNorm's casts and reductions, the rotary embedding's halves, the cache
write by advanced indexing, SDPA's setup for one query, SiLU and the residual adds. On CPU these run as one call
each of the C operations in qwen15/quantize/cpu_decode_ops.c when a forward feeds one new token per row with a
KV cache (the engine's decode step); every other forward (prompts, training shapes, tensors that need gradients,
other devices) runs the model's own code. The projections stay the modules they are (plain, packed, int8/int4,
LoRA). Results equal the eager path's up to rounding: the elementwise steps round where the eager ones do, the
norm sums in another order, attention runs in fp32 (tests/test_cpu_decode.py bounds it).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen15.fuse import FusedAttention, FusedMLP
from qwen15.model import Block, KVCache, RMSNorm
from qwen15.quantize import kernels


def _eligible(x: torch.Tensor) -> bool:
    """CPU, bf16/fp32, and no autograd (the engine decodes under inference_mode; the C operations have no
    backward)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # (a compiled step traces the model's own code)
    )


class CPUDecodeRMSNorm(RMSNorm):
    """RMSNorm that runs the C operation for CPU inference tensors of its weight's dtype."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eligible(x) and x.dtype == self.weight.dtype and x.is_contiguous():
            return kernels.rms_norm(x, self.weight, self.eps)[1]
        return super().forward(x)


class CPUDecodeBlock(Block):
    """A block (fused attention and MLP) whose one-token-per-row forward with a KV cache runs the C operations."""

    def __init__(self, block: Block):
        nn.Module.__init__(self)
        self.input_layernorm = block.input_layernorm
        self.self_attn = block.self_attn
        self.post_attention_layernorm = block.post_attention_layernorm
        self.mlp = block.mlp

    def forward(self, x: torch.Tensor, inputs) -> torch.Tensor:
        step = inputs.__dict__.get("cpu_decode_step")
        if step is None:  # what every layer of this forward shares, worked out by the first
            step = inputs.cpu_decode_step = _step_inputs(x, inputs) or False
        caches = step and self._caches(x, inputs.kv_cache)
        if not caches:
            return super().forward(x, inputs)
        return self._decode(x, *caches, *step)

    def _caches(self, x: torch.Tensor, cache: KVCache):
        """This layer's (k cache, v cache) when the C operations can read them, else None."""
        attn = self.self_attn
        kc, vc = cache.k[attn.layer_idx], cache.v[attn.layer_idx]
        if kc is None or kc.dtype != x.dtype or kc.shape[0] < x.shape[0]:
            return None
        if kc.stride()[2:] != (kc.shape[3], 1) or vc.stride() != kc.stride():
            return None
        nq, nk, nv = attn.qkv_sizes
        if nq % kc.shape[3] or nk != nv or nk != kc.shape[1] * kc.shape[3]:
            return None  # e.g. heads split over processes
        if (
            self.input_layernorm.weight.dtype != x.dtype
            or self.post_attention_layernorm.weight.dtype != x.dtype
        ):
            return None
        return kc, vc

    def _decode(self, x, kc, vc, slots, mask, cos, sin) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        b, d = x.shape[0], x.shape[-1]
        hd = kc.shape[3]
        x = x.reshape(b, d).contiguous()
        _, h = kernels.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.eps)
        qkv = attn.qkv_proj(h).contiguous()
        q = kernels.rope_store(qkv, cos, sin, kc, vc, slots, attn.qkv_sizes[0] // hd, kc.shape[1], hd)
        out = kernels.decode_attention(q, kc, vc, mask, mask.shape[1], hd**-0.5)
        o = attn.o_proj(out).contiguous()
        norm = self.post_attention_layernorm
        x, h = kernels.rms_norm(x, norm.weight, norm.eps, residual=o)
        act = kernels.silu_mul(mlp.gate_up_proj(h).contiguous())
        return (x + mlp.down_proj(act)).view(b, 1, d)


def _step_inputs(x: torch.Tensor, inputs):
    """(slots [B], mask [B or 1, L], cos, sin [B, head_dim]) of a forward that feeds one token per row with a KV
    cache under inference, else None (a prompt, autograd, the engine's prefill view: another cache type)."""
    cache, mask = inputs.kv_cache, inputs.mask
    if type(cache) is not KVCache or mask is None or x.dim() != 3 or x.shape[1] != 1 or not _eligible(x):
        return None
    b, length = x.shape[0], mask.shape[-1]
    if (
        mask.dtype != torch.bool
        or mask.shape[-2] != 1
        or mask.shape[0] not in (1, b)
        or length > cache.max_len
    ):
        return None
    if inputs.cos.shape[0] != b or inputs.cos.dtype != x.dtype:
        return None
    slots = inputs.cache_positions.reshape(-1)
    if slots.numel() not in (1, b):
        return None
    hd = inputs.cos.shape[-1]
    cos, sin = (t.reshape(b, hd).contiguous() for t in (inputs.cos, inputs.sin))
    return slots.expand(b).contiguous(), mask.reshape(mask.shape[0], length).contiguous(), cos, sin


def use_cpu_decode_ops(model: nn.Module) -> bool:
    """Swap the blocks (of fused projections) and norms of a CPU bf16/fp32 model for the variants above, in place,
    where the C operations build here; returns whether it did."""
    p, cfg = next(model.parameters()), model.config
    if p.device.type != "cpu" or kernels.library() is None:
        return False
    if cfg.hidden_size % 16 or cfg.intermediate_size % 16 or cfg.head_dim % 32:
        return False  # the C operations run whole 16-lane vectors (every Qwen1.5 size fits)
    if any(type(t).__name__ == "DTensor" for t in model.parameters()):
        return False  # a tensor-parallel split: the model's own code
    blocks = model.layers.values()
    if not all(isinstance(b.self_attn, FusedAttention) and isinstance(b.mlp, FusedMLP) for b in blocks):
        return False
    for name, block in list(model.layers.items()):
        if type(block) is Block:
            model.layers[name] = CPUDecodeBlock(block)
    if type(model.norm) is RMSNorm:
        model.norm = CPUDecodeRMSNorm(model.norm)
    return True
