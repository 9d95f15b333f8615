"""Apply training-time transformations to an unchanged model (or pipeline stage): tensor parallel, activation
checkpointing, compile, FSDP2.

The order follows torchtitan: tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 (or HSDP).
Checkpointing and compile replace each block's `forward` on the instance instead of wrapping the block in a new
module, so parameter names stay those of the checkpoint (no `_checkpoint_wrapped_module` / `_orig_mod` in them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from qwen15.parallel.layout import ParallelLayout, RunMesh
from qwen15.parallel.tensor_parallel import apply_tensor_parallel


def _saved_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: matrix products, attention and collectives (costly to
    run again); everything else in a block (norms, rotary, SiLU x up, residual adds) is recomputed."""
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, torch.ops.higher_order.flex_attention}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        ops.add(getattr(aten, name).default)
    ops |= {c10d.reduce_scatter_tensor.default, c10d.all_gather_into_tensor.default, c10d.all_reduce.default}
    return ops


def _selective_policy(saved: set):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_context_fn():
    """Forward and recompute contexts of per-op selective checkpointing (see `_saved_ops`)."""
    return create_selective_checkpoint_contexts(_selective_policy(_saved_ops()))


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = True) -> None:
    """Recompute blocks in backward. True ("full"): every op of the block, only block inputs are kept between
    forward and backward; "selective": the outputs of matrix products and attention are kept too and only the
    cheap elementwise ops (norms, rotary, SiLU x up, residual adds) run again."""
    if mode not in (True, "full", "selective"):
        raise ValueError(f"activation checkpointing mode must be true, 'full' or 'selective', got {mode!r}")
    # Full checkpointing passes no context_fn: torch.compile cannot trace one given explicitly.
    options = {"context_fn": selective_context_fn} if mode == "selective" else {}
    for block in model.layers.values():
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **options, **kwargs)

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
    """FSDP2 over `mesh` ("dp_shard", or ("dp_replicate", "dp_shard") for HSDP): each block one unit, the rest
    (embedding, norm, lm_head) the root. Parameters stay fp32 (master weights and optimizer state); compute runs in
    `param_dtype`, gradients are reduced in fp32 and summed, not averaged: the loss is already normalised by the
    global token count (qwen15.train.loss), so averaging again would divide by the world size twice."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again at the start of backward: keeping them saves one all-gather.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum


def uses_autocast(model: nn.Module, compute_dtype: torch.dtype) -> bool:
    """True when the forward must run under torch.autocast: low-precision compute on fp32 parameters that no
    FSDP mixed-precision policy casts (the single-process path of `parallelize`)."""
    return compute_dtype != torch.float32 and not isinstance(model, FSDPModule)


def data_parallel_mesh(mesh: RunMesh, layout: ParallelLayout) -> DeviceMesh:
    """The mesh FSDP2 runs on: ("dp_replicate", "dp_shard") for HSDP, else "dp_shard"."""
    return mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]


def parallelize(
    model: nn.Module,
    mesh: RunMesh,
    layout: ParallelLayout,
    *,
    compute_dtype: torch.dtype,
    activation_checkpointing: bool | str = False,
    compile: bool = False,
) -> nn.Module:
    """Everything in order, on a whole model or on one pipeline stage. With tp > 1 the output layer returns
    vocabulary-split logits (a DTensor) when vocab_parallel, for qwen15.parallel.vocab_parallel_loss. FSDP is
    applied when there is more than one data-parallel rank, or when compute is not fp32 on a tensor- or
    pipeline-parallel run (its mixed-precision policy gives bf16 compute over fp32 master weights there). A single
    process trains the plain module, in bf16 under `torch.autocast` (see `uses_autocast`): FSDP2 on one device
    shards nothing and its per-block hooks cost time. activation_checkpointing: False, True (full) or
    "selective" (see `apply_activation_checkpointing`)."""
    if layout.tp > 1:
        apply_tensor_parallel(
            model,
            mesh["tp"],
            sequence_parallel=layout.sequence_parallel,
            loss_parallel=layout.vocab_parallel,
            vocab_parallel=layout.vocab_parallel,
        )
    if activation_checkpointing:
        apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if layout.dp > 1 or (compute_dtype != torch.float32 and (layout.tp > 1 or layout.pp > 1)):
        apply_fsdp(
            model,
            data_parallel_mesh(mesh, layout),
            param_dtype=compute_dtype,
            reshard_after_forward=layout.reshard_after_forward,
        )
    return model
