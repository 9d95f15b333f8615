"""Tensor parallelism (with sequence parallelism) applied to an unchanged Qwen model through DTensor.

Megatron's split, expressed as DTensor placements on a one-dimensional "tp" mesh:
- q/k/v (weights and biases), gate and up are column-parallel: each rank computes its own heads and MLP columns,
  so attention runs on local heads (the model reads head counts from the tensors) and the KV cache holds them;
- o and down are row-parallel: their partial sums are reduced (all-reduce, or reduce-scatter over the sequence
  with sequence parallelism);
- LoRA adapters (qwen15.lora) split with their projection: a column-parallel projection keeps A [r, in] whole on
  every rank and splits B [out, r] by rows like its weight; a row-parallel one splits A by columns like its
  weight (each rank's partial product is reduced with the base's) and keeps B whole;
- the embedding and the output layer are split over the vocabulary; the logits stay split, and
  `qwen15.parallel.vocab_parallel_loss.cross_entropy` computes the loss from the shards without gathering them.
With sequence parallelism the residual stream and the norms are split along the sequence between the ranks:
the residual is a DTensor sharded on dim 1, so the model still sees the global shape (positions, masks).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from qwen15.lora.modules import LoRALinear


def check_tensor_parallel(config, tp: int, *, vocab_parallel: bool = True) -> None:
    """Refuse shapes that do not split over `tp` ranks (same checks and messages as ParallelLayout.validate)."""
    from qwen15.parallel.layout import ParallelLayout

    ParallelLayout(tp=tp, dp_shard=1, vocab_parallel=vocab_parallel).validate(
        tp, config, where="tensor parallel"
    )


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
    vocab_parallel: bool = True,
) -> nn.Module:
    """Split `model` (a Qwen, or a pipeline stage of one) over the ranks of `tp_mesh`, in place; returns it.

    loss_parallel: the output layer returns logits as a DTensor sharded over the vocabulary (feed them to
        qwen15.parallel.vocab_parallel_loss.cross_entropy); otherwise every rank gets the full logits as a plain tensor.
    vocab_parallel: split the embedding and output layer over the vocabulary; False keeps a full copy of both on
        every rank (then loss_parallel does not apply: the logits are whole).
    Every rank must hold the same weights beforehand (same seed or checkpoint): the split matrices are cut from
    rank 0's copy, the norms are used as each rank holds them.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be one-dimensional, got {tp_mesh.ndim} dims; pass mesh['tp']")
    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp, vocab_parallel=vocab_parallel)
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()
    tied = getattr(model.config, "tie_word_embeddings", False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}

    plan: dict[str, object] = {}
    if model.embed_tokens is not None:
        if vocab_parallel:
            plan["embed_tokens"] = RowwiseParallel(
                input_layouts=Replicate(), output_layouts=residual, use_local_output=not sp
            )
        else:
            plan["embed_tokens"] = _Replicated(output_layout=residual, local_output=not sp)
    if model.norm is not None and sp:
        plan["norm"] = SequenceParallel()
    if model.lm_head is not None:
        if vocab_parallel:
            plan["lm_head"] = ColwiseParallel(
                input_layouts=residual,
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            )
        else:
            plan["lm_head"] = _Replicated(input_layout=residual, local_output=True)
    parallelize_module(model, tp_mesh, plan)

    # Inside each block: attention and MLP take the full sequence (all-gathered from the sequence shards with sp)
    # and hand back partial sums reduced onto the residual's layout.
    block_plan: dict[str, object] = {
        "self_attn": PrepareModuleInput(  # Attention.forward(x, inputs): only x is split
            input_layouts=(residual, None), desired_input_layouts=(Replicate(), None), use_local_output=True
        ),
        "self_attn.q_proj": _Colwise(),
        "self_attn.k_proj": _Colwise(),
        "self_attn.v_proj": _Colwise(),
        "self_attn.o_proj": _Rowwise(output_layouts=residual, use_local_output=not sp),
        "mlp": PrepareModuleInput(
            input_layouts=(residual,), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "mlp.gate_proj": _Colwise(),
        "mlp.up_proj": _Colwise(),
        "mlp.down_proj": _Rowwise(output_layouts=residual, use_local_output=not sp),
    }
    if sp:
        block_plan["input_layernorm"] = SequenceParallel()
        block_plan["post_attention_layernorm"] = SequenceParallel()
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)

    if tied and model.embed_tokens is not None and model.lm_head is not None:
        # parallelize_module gave each module its own parameter; both are the same split of the same tensor.
        model.lm_head.weight = model.embed_tokens.weight
    for name, p in model.named_parameters():  # some styles build their DTensor parameters trainable
        if name in frozen:
            p.requires_grad_(False)
    return model


def _distribute(module: nn.Module, name: str, placement: Placement, mesh: DeviceMesh) -> None:
    param = getattr(module, name)
    if param is not None:
        split = nn.Parameter(distribute_tensor(param, mesh, [placement]), param.requires_grad)
        module.register_parameter(name, split)


class _Colwise(ColwiseParallel):
    """ColwiseParallel that also splits a LoRALinear's adapter: A whole, B by output rows (as the weight)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name:  # the adapter's own linears, already split with their LoRALinear
            return
        if not isinstance(module, LoRALinear):
            return super()._partition_linear_fn(name, module, device_mesh)
        _distribute(module, "weight", Shard(0), device_mesh)
        _distribute(module, "bias", Shard(0), device_mesh)
        _distribute(module.lora_A, "weight", Replicate(), device_mesh)
        _distribute(module.lora_B, "weight", Shard(0), device_mesh)


class _Rowwise(RowwiseParallel):
    """RowwiseParallel that also splits a LoRALinear's adapter: A by input columns (as the weight), B whole."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name:  # the adapter's own linears, already split with their LoRALinear
            return
        if not isinstance(module, LoRALinear):
            return super()._partition_linear_fn(name, module, device_mesh)
        _distribute(module, "weight", Shard(1), device_mesh)
        _distribute(module, "bias", Replicate(), device_mesh)
        _distribute(module.lora_A, "weight", Shard(1), device_mesh)
        _distribute(module.lora_B, "weight", Replicate(), device_mesh)


class _Replicated(ParallelStyle):
    """A full copy of the module's parameters on every TP rank (DTensor Replicate), for vocab_parallel=False.

    Kept as DTensors so that FSDP2 sees one kind of parameter on a 2-D mesh, and so gradients stay consistent.
    """

    def __init__(self, *, input_layout=None, output_layout=None, local_output: bool = True):
        super().__init__()
        self.input_layout = input_layout
        self.output_layout = output_layout or Replicate()
        self.local_output = local_output

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                dist = nn.Parameter(distribute_tensor(param, mesh, [Replicate()]), param.requires_grad)
                mod.register_parameter(p_name, dist)

        def prepare_input(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [self.input_layout or Replicate()], run_check=False)
            return (x.redistribute(placements=[Replicate()]), *inputs[1:])

        def prepare_output(mod, out, mesh):
            if out.placements != (self.output_layout,):
                out = out.redistribute(placements=[self.output_layout])
            return out.to_local() if self.local_output else out

        return distribute_module(module, mesh, partition, prepare_input, prepare_output)
