"""Filling a model that may be sharded (FSDP2 / DTensor) with its initial weights: a seeded random init, or a
Hugging Face folder.

The model is built on the meta device, parallelized, then materialised with `to_empty`; each parameter is then
produced as the full tensor and each rank copies only its own slice. So the initial weights are the same for any
number of processes and any sharding (the basis of the 1-vs-N-process equivalence), no rank ever holds the whole
model, and a Hugging Face checkpoint is read through memory maps (each rank touches only its slices' pages).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qwen15.hf_checkpoint import (
    _DTYPES,
    CheckpointError,
    _weight_files,
    check_names,
    hf_name,
    read_safetensors_header,
)
from qwen15.model import RMSNorm


def local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of the full tensor `full` that this rank holds of `param` (all of it for a plain tensor)."""
    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return full[index]


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full (the global tensor), slicing first so that only this rank's part is converted and moved."""
    target = param.to_local() if isinstance(param, DTensor) else param
    target.copy_(local_slice(param, full))


def _parameters(parts: nn.Module | list[nn.Module]) -> tuple[list[nn.Module], dict[str, torch.Tensor]]:
    """The model parts (a whole model, or this rank's pipeline stages) and their parameters by full-model name
    (stages keep the full model's names: layers.17... stays layers.17...)."""
    parts = list(parts) if isinstance(parts, list | tuple) else [parts]
    params: dict[str, torch.Tensor] = {}
    for part in parts:
        params.update(dict(part.named_parameters(remove_duplicate=False)))
    return parts, params


def _meta_model(config) -> nn.Module:
    from qwen15.model import Qwen

    with torch.device("meta"):
        return Qwen(config)


@torch.no_grad()
def init_weights(model: nn.Module | list[nn.Module], seed: int, std: float = 0.02) -> None:
    """The reference initialisation of Qwen.init_weights (normal(0, std) matrices, zero biases, unit norms), drawn
    in the same order from the same generator, so that a sharded model gets bitwise the same weights as
    `Qwen.from_config(config, seed=seed)` on the same device type. `model` may be a list of pipeline stages:
    every tensor of the whole model is drawn (keeping the generator's order), each stage keeps its own."""
    parts, params = _parameters(model)
    device = _device_of(parts[0])
    dtype = next(iter(params.values())).dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, module in _meta_model(parts[0].config).named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear | nn.Embedding):
            full = torch.empty(module.weight.shape, dtype=dtype, device=device).normal_(
                0.0, std, generator=generator
            )
            if prefix + "weight" in params:
                copy_full_(params[prefix + "weight"], full)
            if getattr(module, "bias", None) is not None and prefix + "bias" in params:
                params[prefix + "bias"].zero_()  # zero everywhere: no need for the full tensor
        elif isinstance(module, RMSNorm) and prefix + "weight" in params:
            params[prefix + "weight"].fill_(1.0)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if isinstance(p, DTensor) else p.device


@torch.no_grad()
def load_hf_weights(model: nn.Module | list[nn.Module], folder: str | Path) -> None:
    """Copy the weights of a Hugging Face folder (safetensors, single or sharded) into `model`, which may be
    sharded or a list of pipeline stages. Names and shapes are checked first, against the whole model (missing
    q/k/v biases, wrong config.json ...)."""
    folder = Path(folder)
    parts, params = _parameters(model)
    config = parts[0].config
    kind, files = _weight_files(folder)
    if kind != "safetensors":
        raise CheckpointError(
            f"{folder}: training reads safetensors weights only (found pytorch_model.bin); convert them once "
            "with `Qwen.from_pretrained(folder).save_pretrained(new_folder)`"
        )
    tied = config.tie_word_embeddings
    shapes = {
        hf_name(k): tuple(p.shape)
        for k, p in _meta_model(config).named_parameters(remove_duplicate=False)
        if not (tied and k == "lm_head.weight")
    }
    params = {hf_name(k): p for k, p in params.items() if not (tied and k == "lm_head.weight")}
    entries = {}
    for f in files:
        entries.update(read_safetensors_header(f))
    check_names(
        shapes,
        {k: e.shape for k, e in entries.items()},
        tied,
        str(folder),
    )
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(entries[name].file, []).append(name)
    for path, names in by_file.items():
        mapped = np.memmap(
            path, dtype=np.uint8, mode="c"
        )  # copy-on-write: never written, but torch wants it writable
        for name in names:
            e = entries[name]
            if e.dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {e.dtype}, which is not supported")
            np_dtype, torch_dtype = _DTYPES[e.dtype]
            raw = mapped[e.begin : e.end].view(np_dtype)
            full = torch.from_numpy(raw).view(torch_dtype).view(e.shape)  # zero-copy view of the mapped file
            copy_full_(params[name], full)
        del mapped
