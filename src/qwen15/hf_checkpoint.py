"""Models in and out of Hugging Face folders (the files themselves: qwen15.hf_folder).

Reading fills a model built on the meta device and materialised with `to_empty`, possibly sharded (FSDP2 / tensor
parallel DTensors) or cut into pipeline stages: each rank copies only its own slice of every tensor, straight from
the memory-mapped file, a bounded number of rows at a time, releasing the mapped pages as it goes. So peak memory
stays close to the weights this rank holds, never the checkpoint's size on top of them.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qwen15.hf_folder import (
    DTYPES,
    CheckpointError,
    OutTensor,
    TensorEntry,
    check_names,
    default_generation_config,
    hf_name,
    read_generation_config,
    weight_entries,
    write_hf_folder,
)
from qwen15.model_config import ModelConfig
from qwen15.paths import local_folder

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_CHUNK = 64 * 2**20  # bytes copied from a mapped file, or written from a tensor, at a time


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators (Qwen overflows in fp16), fp32 on CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def model_folder(path: str | os.PathLike) -> Path:
    return local_folder(path, "model")


# ---------------------------------------------------------------------------------------------- reading


def _parameters(parts: nn.Module | list[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters of a model or of this rank's pipeline stages, by full-model Hugging Face name (a tied lm_head is
    the embedding: left out)."""
    parts = list(parts) if isinstance(parts, list | tuple) else [parts]
    config = parts[0].config
    params: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, p in part.named_parameters(remove_duplicate=False):
            if not (config.tie_word_embeddings and name == "lm_head.weight"):
                params[hf_name(name)] = p
    return params


def local_region(param: torch.Tensor, full_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of the block of the full tensor that this rank holds of `param` (all of it when plain)."""
    if not isinstance(param, DTensor):
        return (0,) * len(full_shape), tuple(full_shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full_shape, param.device_mesh, param.placements)
    return tuple(offset), tuple(shape)


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full (the global tensor), slicing first so that only this rank's part is converted and moved."""
    offset, shape = local_region(param, tuple(full.shape))
    target = param.to_local() if isinstance(param, DTensor) else param
    target.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])


@torch.no_grad()
def load_weights(parts: nn.Module | list[nn.Module], folder: str | os.PathLike) -> None:
    """Copy the weights of a Hugging Face folder into `parts` (a model or this rank's pipeline stages, plain or
    sharded; parameters already materialised). Names and shapes are checked first against the whole model.
    Parameters the plain model does not have (adapters swapped in from outside, qwen15.lora) are not read."""
    folder = model_folder(folder)
    first = parts[0] if isinstance(parts, list | tuple) else parts
    with torch.device("meta"):
        whole = type(first)(first.config)  # the whole model's names and shapes, also for a pipeline stage
    expected = {n: tuple(p.shape) for n, p in _parameters(whole).items()}
    params = {n: p for n, p in _parameters(parts).items() if n in expected}
    config = first.config
    entries = weight_entries(folder)
    check_names(expected, {k: e.shape for k, e in entries.items()}, config.tie_word_embeddings, str(folder))
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(entries[name].file, []).append(name)
    for path, names in by_file.items():
        _copy_from_file(path, sorted(names, key=lambda n: entries[n].begin), entries, params)
    check_finite(params, str(folder))


def check_finite(params: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity: generation would print garbage and perplexity nan, without a word
    (this rank's slices; a full pass over the weights, cheap next to reading them)."""
    bad = []
    for name, p in params.items():
        local = p.to_local() if isinstance(p, DTensor) else p
        if not local.is_floating_point():
            continue
        # a few million elements at a time: isfinite of a whole embedding would allocate several times its size
        if not all(bool(torch.isfinite(part).all()) for part in local.detach().reshape(-1).split(1 << 22)):
            bad.append(name)
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}); the "
            "checkpoint is corrupt or comes from a training that diverged. Use an earlier checkpoint"
        )


def _copy_from_file(
    path: Path, names: list[str], entries: dict[str, TensorEntry], params: dict[str, torch.Tensor]
) -> None:
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch wants writable memory
        try:
            for name in names:
                e, param = entries[name], params[name]
                np_dtype, torch_dtype = DTYPES[e.dtype][0], TORCH_DTYPES[e.dtype]
                offset, shape = local_region(param, e.shape)
                target = param.to_local() if isinstance(param, DTensor) else param
                if target.numel() == 0:
                    continue
                if not e.shape:
                    array = np.frombuffer(mm, dtype=np_dtype, count=1, offset=e.begin)
                    target.copy_(torch.from_numpy(array).view(torch_dtype).view(()))
                    continue
                row_bytes = (e.end - e.begin) // e.shape[0]
                cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
                step = max(1, _CHUNK // max(row_bytes, 1))
                for r0 in range(0, shape[0], step):
                    r1 = min(shape[0], r0 + step)
                    begin = e.begin + (offset[0] + r0) * row_bytes
                    end = e.begin + (offset[0] + r1) * row_bytes
                    count = (end - begin) // np.dtype(np_dtype).itemsize
                    array = np.frombuffer(mm, dtype=np_dtype, count=count, offset=begin)
                    rows = torch.from_numpy(array).view(torch_dtype).view(r1 - r0, *e.shape[1:])
                    target[r0:r1].copy_(rows[(slice(None), *cols)])
                    del rows, array
                    start = (begin // page) * page
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        finally:
            mm.close()


def load_pretrained(
    cls,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device="cpu",
    split: Callable[[nn.Module], object] | None = None,
):
    """`cls.from_pretrained`: the model of a Hugging Face folder, on `device` in `dtype`, in eval mode. `split`
    is applied to the model while it is still on the meta device (e.g. tensor parallel): each rank then
    materialises and reads only its own slices."""
    folder = model_folder(path)
    config = ModelConfig.from_json_file(folder / "config.json")
    device = torch.device(device)
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype or default_dtype(device))
    if split is not None:
        split(model)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, folder)
    model.generation_config = read_generation_config(folder)
    model.source_dir = str(folder)
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing


def tensor_blocks(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Iterator[np.ndarray]:
    """A tensor's bytes as numpy row blocks (on CPU, cast to `dtype`), a bounded number of rows at a time."""
    dtype = dtype or tensor.dtype
    rows = tensor.shape[0] if tensor.dim() else 1
    row_bytes = max(1, tensor[0].numel() * dtype.itemsize if tensor.dim() else dtype.itemsize)
    flat = tensor.detach().reshape(rows, -1)
    step = max(1, _CHUNK // row_bytes)
    for r0 in range(0, rows, step):
        block = flat[r0 : r0 + step].to("cpu", dtype).contiguous()
        yield (block.view(torch.uint16) if dtype == torch.bfloat16 else block).numpy()


def out_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[OutTensor]:
    """The writer's view of tensors in memory (written as `dtype`, default their own)."""
    return [
        OutTensor(name, tuple(t.shape), DTYPE_NAMES[dtype or t.dtype], lambda t=t: tensor_blocks(t, dtype))
        for name, t in state.items()
    ]


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names; a tied lm_head is left out (as transformers expects)."""
    tied = model.config.tie_word_embeddings
    return {hf_name(k): v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    generation_config: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """`Qwen.save_pretrained`: the model's weights in their dtype, its config and generation config, and the
    tokenizer (given, or copied from the folder the model was loaded from). An existing folder is replaced only
    when qwen15 wrote it (and overwrite is True), never the folder the model was loaded from."""
    state = hf_state_dict(model)
    with torch.device("meta"):
        expected = hf_state_dict(type(model)(model.config))
    if set(state) != set(expected):
        raise CheckpointError(
            f"cannot save to {path}: the model was prepared for inference (fused, quantized or packed weights "
            "change its tensors) or holds LoRA adapters; save a model loaded without prepare_for_inference, and "
            "merge adapters first (qwen15.merge_adapters) or save them alone (qwen15.save_adapter)"
        )
    dtype = next(iter(state.values())).dtype
    config = model.config.replace(torch_dtype=DTYPE_NAMES.get(dtype, model.config.torch_dtype))
    return write_hf_folder(
        path,
        config,
        out_tensors(state),
        generation=generation_config or model.generation_config or default_generation_config(config),
        tokenizer=tokenizer,
        tokenizer_dir=None if tokenizer is not None else getattr(model, "source_dir", None),
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        inputs=[getattr(model, "source_dir", None)],
        flag="save_pretrained path",
    )
