"""Fused projections for inference: q/k/v as one matrix and gate/up as one, swapped in from outside the model.

One larger matrix product instead of three (or two) small ones is what a batch-1 decode step is short of; outputs
equal the unfused model's up to the summation order of the matrix product. The swapped modules have other tensor
names, so a fused model is for inference only (it refuses to be saved; load the checkpoint again for that).
Projections with LoRA adapters fuse too: the adapters become one over the fused projection (qwen15.lora).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen15.lora.modules import fuse_adapters
from qwen15.model import MLP, Attention, apply_rotary


@torch.no_grad()
def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the concatenation of the given ones' outputs (a LoRALinear when some of
    them carry adapters). Quantized modules (a model loaded quantized) concatenate through their `concat`."""
    if not isinstance(linears[0], nn.Linear):
        return type(linears[0]).concat(linears)
    w = linears[0].weight
    has_bias = linears[0].bias is not None
    fused = nn.Linear(
        w.shape[1], sum(m.out_features for m in linears), bias=has_bias, device=w.device, dtype=w.dtype
    )
    fused.weight.copy_(torch.cat([m.weight for m in linears]))
    if has_bias:
        fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fuse_adapters(linears, fused)


class FusedAttention(Attention):
    """Attention whose q/k/v projections are one `qkv_proj`."""

    def __init__(self, attention: Attention):
        nn.Module.__init__(self)
        self.layer_idx, self.head_dim = attention.layer_idx, attention.head_dim
        parts = [attention.q_proj, attention.k_proj, attention.v_proj]
        self.qkv_proj = concat_linears(parts)
        self.qkv_sizes = [p.out_features for p in parts]
        self.o_proj = attention.o_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return q, k, v

    def rotated_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """As Attention's, with q and k heads rotated in one call: the same values from half the small ops that
        a batch-1 decode step spends on the rotary embedding."""
        b, s, _ = x.shape
        nq, nk, _ = self.qkv_sizes
        qkv = self.qkv_proj(x)
        qk = apply_rotary(qkv[..., : nq + nk].view(b, s, -1, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk.split([nq // self.head_dim, nk // self.head_dim], dim=1)
        return q, k, qkv[..., nq + nk :].view(b, s, -1, self.head_dim).transpose(1, 2)


class FusedMLP(MLP):
    """MLP whose gate and up projections are one `gate_up_proj`."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.gate_up_proj = concat_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return gate, up


def fuse_projections(model: nn.Module) -> nn.Module:
    """Swap every block's attention and MLP for their fused variants, in place; returns the model."""
    for block in model.layers.values():
        if type(block.self_attn) is Attention:
            block.self_attn = FusedAttention(block.self_attn)
        if type(block.mlp) is MLP:
            block.mlp = FusedMLP(block.mlp)
    return model
