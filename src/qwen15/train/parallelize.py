"""Apply training-time transformations to an unchanged model: activation checkpointing, compile, FSDP2.

The order follows torchtitan: (tensor parallel, later) -> activation checkpointing -> torch.compile -> FSDP2.
Checkpointing and compile replace each block's `forward` on the instance instead of wrapping the block in a new
module, so parameter names stay those of the checkpoint (no `_checkpoint_wrapped_module` / `_orig_mod` in them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block in backward: only block inputs are kept between forward and backward."""
    for block in model.layers.values():
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block (they share one graph: every block has the same code and shapes)."""
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, dynamic=False)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 over the "dp_shard" mesh dimension: each block is one unit, the rest (embedding, norm, lm_head) the
    root. Parameters stay fp32 (master weights and optimizer state); compute runs in `param_dtype`, gradients
    are reduced in fp32. Gradients are summed, not averaged, across ranks: the loss is already normalised by the
    global token count (qwen15.train.loss), so averaging again would divide by the world size twice.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh = mesh["dp_shard"]
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again at the start of backward: keeping them saves one all-gather.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation without communication: reduce only on the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    compute_dtype: torch.dtype,
    activation_checkpointing: bool = False,
    compile: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Everything in order. FSDP is applied when the mesh has more than one rank or compute is not fp32 (its
    mixed-precision policy is what gives bf16 compute over fp32 master weights); a single fp32 process trains the
    plain module."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mesh.size() > 1 or compute_dtype != torch.float32:
        apply_fsdp(model, mesh, param_dtype=compute_dtype, reshard_after_forward=reshard_after_forward)
    return model
