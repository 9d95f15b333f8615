"""AdamW with fp32 state (no decay on norms and biases), linear warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from qwen15.train.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (projections, embedding, lm_head) decay; vectors (RMSNorm weights, q/k/v biases) do not. Under
    tensor parallelism without FSDP some parameters are DTensors and some (norms without sequence parallel) plain
    tensors; the fused kernel takes one kind per call, so each kind gets its own group ("decay" marks which
    groups decay, for resume)."""
    groups: dict[tuple[bool, bool], list] = {}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied lm_head is the embedding: one parameter, one state
        groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    kinds = sorted({distributed for _, distributed in groups}) or [False]
    out = []
    for decay in (True, False):
        for distributed in kinds:
            params = groups.get((decay, distributed), [])
            # No empty group: DCP's flattened optimizer state cannot hold one (a LoRA run has no vectors).
            if params:
                out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "decay": decay})
    return out


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay if group.get("decay", True) else 0.0


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the model's (fp32 master) parameters, so its moments are fp32 too (a pipeline rank builds one
    per stage it holds). The fused kernel (one pass over each tensor) exists for CPU and CUDA; on CPU it is ~7x
    faster than the multi-tensor one for a 160M-element embedding."""
    device = next(model.parameters()).device
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device.type in ("cpu", "cuda") or None,
    )


def lr_at(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup to lr over warmup_steps, then cosine to min_lr at
    the last update (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(
    model: nn.Module | list[nn.Module], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> float:
    """Global L2 norm of all gradients (over every shard on every rank); scales them to max_norm when above it
    (max_norm 0: measure only). Returns the norm before clipping.

    `model` may be this rank's pipeline stages (a list) with `pp_group` the pipeline ranks: the squared norms of
    the stages add up over it. Gradients that are DTensors (FSDP2 shards, tensor-parallel splits, or both) are
    grouped by mesh and placement, and each group's norm is completed over its mesh (shards add up, replicas do
    not count twice); plain tensors (a replicated norm weight without sequence parallel, a single process) are
    the same on every rank and count once.
    """
    parts = model if isinstance(model, list | tuple) else [model]
    params = list({id(p): p for m in parts for p in m.parameters() if p.grad is not None}.values())
    grads = [p.grad for p in params]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else (None, None)
        groups.setdefault(key, []).append(g)
    device = grads[0].to_local().device if grads and isinstance(grads[0], DTensor) else None
    squares = torch.zeros((), dtype=torch.float32, device=device or (grads[0].device if grads else "cpu"))
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the sharded norms combine across ranks here
        squares += norm.float().to(squares.device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=pp_group)
    total = squares.sqrt()
    if max_norm > 0 and grads:
        if len(groups) == 1 and pp_group is None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        else:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
    return float(total)
