"""Pipeline parallelism: the model cut into stages of whole layers, run by torch.distributed.pipelining.

The cut is balanced by cost in "layers": each transformer layer weighs 1, the embedding and the output layer what
the layout says (by default from the shapes: the output layer's matmul and parameters are vocab x hidden, which
is `ratio` layers; the embedding has the same parameters but almost no compute, so it weighs ratio / 2). Stages
sit on ranks looped (stage i on pipeline rank i % pp), as torch's multi-stage schedules expect.

Order of composition, per stage: cut (`stage_modules`), then tensor parallel, then FSDP2, then `build_schedule`.
Stage boundaries carry plain tensors: with sequence parallelism a stage sends its sequence shard and the next
stage re-wraps it as a DTensor, and the last stage hands vocabulary-split logits to the loss as a DTensor again
(hooks on the stage module, which stays the module the schedule runs: with FSDP2 the schedule then defers the
gradient reduce-scatter to the end of the step instead of running it after every micro-batch).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from qwen15.model_config import ModelConfig
from qwen15.parallel.layout import ParallelLayout


def default_costs(config: ModelConfig) -> tuple[float, float]:
    """(embedding, output layer) cost in transformer layers, from the model shape."""
    per_layer = config.num_params(include_embedding=False) / config.num_hidden_layers
    ratio = config.vocab_size * config.hidden_size / per_layer
    return ratio / 2, ratio


def split_layers(
    num_layers: int, num_stages: int, embedding_cost: float = 0.0, output_cost: float = 0.0
) -> list[range]:
    """Contiguous layer ranges, one per stage (each at least one layer), minimising the most expensive stage.

    Among the cuts with the same maximum, the one with the smallest sum of squared stage costs (the most even).
    """
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages of at least one layer")

    def cost(stage: int, n: int) -> float:
        return n + (embedding_cost if stage == 0 else 0.0) + (output_cost if stage == num_stages - 1 else 0.0)

    # best[s][used] = (max cost, sum of squares, layers of stage s) over stages 0..s holding `used` layers.
    inf = (float("inf"), float("inf"), 0)
    best = [[inf] * (num_layers + 1) for _ in range(num_stages)]
    for used in range(1, num_layers - num_stages + 2):
        c = cost(0, used)
        best[0][used] = (c, c * c, used)
    for s in range(1, num_stages):
        for used in range(s + 1, num_layers - (num_stages - s - 1) + 1):
            for n in range(1, used - s + 1):
                prev = best[s - 1][used - n]
                c = cost(s, n)
                cand = (max(prev[0], c), prev[1] + c * c, n)
                if cand[:2] < best[s][used][:2]:
                    best[s][used] = cand
    counts = []
    used = num_layers
    for s in range(num_stages - 1, -1, -1):
        n = best[s][used][2]
        counts.append(n)
        used -= n
    counts.reverse()
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def stage_ranges(config: ModelConfig, layout: ParallelLayout) -> list[range]:
    """The layers of each of the layout's stages (stage order, not rank order)."""
    embed, out = default_costs(config)
    if layout.pp_embedding_cost is not None:
        embed = layout.pp_embedding_cost
    if layout.pp_output_cost is not None:
        out = layout.pp_output_cost
    return split_layers(config.num_hidden_layers, layout.num_stages, embed, out)


def stage_indices(layout: ParallelLayout, pp_rank: int) -> list[int]:
    """Stages held by one pipeline rank: pp_rank, pp_rank + pp, ... (looped, as the schedules expect)."""
    return list(range(pp_rank, layout.num_stages, layout.pp))


def stage_modules(model: nn.Module, layout: ParallelLayout, pp_rank: int) -> list[nn.Module]:
    """This rank's stages of `model`, each a Qwen holding only its layers (and the embedding on the first stage,
    the final norm and output layer on the last). `model` itself becomes the first of them; build it on the meta
    device for large models (the pruned stages are then materialised and loaded)."""
    ranges = stage_ranges(model.config, layout)
    indices = stage_indices(layout, pp_rank)
    modules = []
    for k, stage in enumerate(indices):
        module = model if k == len(indices) - 1 else copy.deepcopy(model)
        keep = {str(i) for i in ranges[stage]}
        for name in list(module.layers.keys()):
            if name not in keep:
                del module.layers[name]
        if stage != 0:
            module.embed_tokens = None
        if stage != layout.num_stages - 1:
            module.norm = None
            module.lm_head = None
        modules.append(module)
    return modules


class _StageBoundary:
    """Plain tensors in and out of a stage, as torch.distributed.pipelining sends them, via hooks on the stage
    module itself (so that the module the schedule runs is the FSDP2 root, whose gradient sync it manages).

    With sequence parallelism the hidden states between stages are this rank's sequence shard; they are wrapped
    back into a DTensor (sharded on the sequence) for the stage's layers. Outputs that are DTensors leave as their
    local part: a sequence shard, or the rank's vocabulary slice of the logits (the loss re-wraps those).
    """

    def __init__(self, module: nn.Module, tp_mesh: DeviceMesh | None, sequence_parallel: bool):
        self.tp_mesh = tp_mesh
        self.sequence_parallel = sequence_parallel and tp_mesh is not None and tp_mesh.size() > 1
        self.logits_split = False
        for handle in getattr(module, "_stage_boundary_hooks", ()):
            handle.remove()
        module._stage_boundary_hooks = (
            module.register_forward_pre_hook(self._inputs, with_kwargs=True),
            module.register_forward_hook(self._output),
        )

    def _inputs(self, module, args, kwargs):
        if module.embed_tokens is None and self.sequence_parallel and not isinstance(args[0], DTensor):
            args = (DTensor.from_local(args[0], self.tp_mesh, [Shard(1)], run_check=False), *args[1:])
        return args, kwargs

    def _output(self, module, args, out):
        if isinstance(out, DTensor):
            self.logits_split = module.lm_head is not None and out.placements[0] != Shard(1)
            out = out.to_local()
        return out


def build_schedule(
    modules: list[nn.Module],
    layout: ParallelLayout,
    pp_mesh: DeviceMesh,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
    *,
    tp_mesh: DeviceMesh | None = None,
    sequence_parallel: bool | None = None,
):
    """The pipeline schedule of this rank's stage modules (after tensor parallel and FSDP2 were applied to them).

    loss_fn(logits, labels) -> scalar, called per micro-batch on the last stage; the schedule sums the gradients
    of the micro-batches without scaling, so return the micro-batch's loss sum divided by the token count of the
    whole step (then the result equals one big batch's mean, whatever the split). Logits split over the
    vocabulary arrive as a DTensor, so qwen15.parallel.vocab_parallel_loss.cross_entropy computes it without gathering.
    Run a step with `schedule.step(input_ids, target=labels, losses=list, **model_kwargs)` on every pipeline
    rank (the first stage reads input_ids, the last labels; model_kwargs such as document_ids reach all stages).
    """
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    if sequence_parallel is None:
        sequence_parallel = layout.sequence_parallel
    pp_rank = pp_mesh.get_local_rank()
    indices = stage_indices(layout, pp_rank)
    if len(indices) != len(modules):
        raise ValueError(f"pipeline rank {pp_rank} holds stages {indices} but got {len(modules)} modules")
    boundaries = [_StageBoundary(m, tp_mesh, sequence_parallel) for m in modules]
    last = boundaries[-1] if indices[-1] == layout.num_stages - 1 else None

    def stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if last is not None and last.logits_split:
            output = DTensor.from_local(output, tp_mesh, [Shard(-1)], run_check=False)
        return loss_fn(output, target)

    group = pp_mesh.get_group()
    device = torch.device(device)
    stages = [
        PipelineStage(module, stage, layout.num_stages, device, group=group)
        for module, stage in zip(modules, indices)
    ]
    kind = layout.pp_schedule
    if kind == "Interleaved1F1B":
        return ScheduleInterleaved1F1B(stages, layout.microbatches, loss_fn=stage_loss, scale_grads=False)
    schedule_class = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[kind]
    return schedule_class(stages[0], layout.microbatches, loss_fn=stage_loss, scale_grads=False)
