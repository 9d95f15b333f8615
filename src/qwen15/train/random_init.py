"""The seeded random initialisation of a model that may be sharded (FSDP2 / DTensor) or cut into pipeline stages.

Every tensor of the whole model is drawn in full, in the order of `Qwen.init_weights`, from one generator, and each
rank keeps its own slice: the initial weights are bitwise those of `Qwen.from_config(config, seed=seed)` on the
same device type for any number of processes and any layout (the basis of the 1-vs-N-process equivalence).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qwen15.hf_checkpoint import copy_full_
from qwen15.model import Qwen, RMSNorm


@torch.no_grad()
def init_weights(model: nn.Module | list[nn.Module], seed: int, std: float = 0.02) -> None:
    """normal(0, std) matrices, zero biases, unit norms, into `model` (a model or this rank's pipeline stages)."""
    parts = list(model) if isinstance(model, list | tuple) else [model]
    params: dict[str, torch.Tensor] = {}
    for part in parts:
        params.update(dict(part.named_parameters(remove_duplicate=False)))
    first = next(iter(params.values()))
    device = first.to_local().device if isinstance(first, DTensor) else first.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        whole = Qwen(parts[0].config)
    for name, module in whole.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear | nn.Embedding):
            full = torch.empty(module.weight.shape, dtype=first.dtype, device=device)
            full.normal_(0.0, std, generator=generator)
            if prefix + "weight" in params:
                copy_full_(params[prefix + "weight"], full)
            if getattr(module, "bias", None) is not None and prefix + "bias" in params:
                params[prefix + "bias"].zero_()  # zero everywhere: no need for the full tensor
        elif isinstance(module, RMSNorm) and prefix + "weight" in params:
            params[prefix + "weight"].fill_(1.0)
