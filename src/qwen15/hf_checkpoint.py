"""Hugging Face model folders in and out: config.json, safetensors weights (single or sharded), generation_config.json
and tokenizer files. The package's one reader and one writer of them.

Reading fills a model built on the meta device and materialised with `to_empty`, possibly sharded (FSDP2 / tensor
parallel DTensors) or cut into pipeline stages: each rank copies only its own slice of every tensor, straight from
the memory-mapped file, a bounded number of rows at a time, releasing the mapped pages as it goes. So peak memory
stays close to the weights this rank holds, never the checkpoint's size on top of them.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from qwen15.atomic import atomic_directory, atomic_write_text
from qwen15.errors import UserError
from qwen15.model_config import CHAT_SAMPLING, ENDOFTEXT_ID, IM_END_ID, ModelConfig
from qwen15.paths import local_folder

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

# safetensors dtype name -> (numpy dtype of the raw bytes, torch dtype)
SAFETENSORS_DTYPES: dict[str, tuple[Any, torch.dtype]] = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}
_CHUNK = 64 * 2**20  # bytes copied from a mapped file at a time
_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer some exporters save; recomputed from config.json


class CheckpointError(UserError):
    """A checkpoint that does not fit the model; the message names the file and the tensors concerned."""


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face name."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators (Qwen overflows in fp16), fp32 on CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def model_folder(path: str | os.PathLike) -> Path:
    return local_folder(path, "model")


# ---------------------------------------------------------------------------------------------- the files


@dataclass
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(raw, "little")
            if n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (named by the checkpoint index)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    size = path.stat().st_size
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = spec["data_offsets"]
            entry = TensorEntry(path, spec["dtype"], tuple(spec["shape"]), 8 + n + begin, 8 + n + end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        if entry.end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} runs past the end of the file (truncated download?)"
            )
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry.dtype}, which is not supported")
        entries[name] = entry
    return entries


def weight_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the folder's safetensors files (indexed, single or loose), by Hugging Face name."""
    if (folder / SAFE_INDEX).exists():
        index = read_json(folder / SAFE_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / SAFE_INDEX}: 'weight_map' is missing or empty")
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / SAFE_SINGLE).exists():
        files = [folder / SAFE_SINGLE]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise CheckpointError(
                f"{folder}: holds {pickled[0]} (PyTorch pickle) but no safetensors; qwen15 never unpickles weight "
                'files. Convert once where transformers is installed: python -c "from transformers import '
                f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\""
            )
        raise CheckpointError(f"{folder}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")
    entries: dict[str, TensorEntry] = {}
    for f in files:
        entries.update(read_safetensors_header(f))
    return entries


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); is it a JSON file?") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_names(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    tied: bool,
    where: str,
    *,
    subject: str = "the weights do not match config.json",
    hint: str = "Check that config.json belongs to these weights (a q/k/v bias or lm_head dropped by a "
    "converter shows up here)",
) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming them (`subject` and `hint` frame the message)."""
    found = {k: v for k, v in found.items() if not k.endswith(_IGNORED_SUFFIX)}
    if tied and "lm_head.weight" in found and "model.embed_tokens.weight" in expected:
        expected = dict(expected, **{"lm_head.weight": expected["model.embed_tokens.weight"]})
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {list(found[k])}, model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_abbrev(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_abbrev(unexpected))}")
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(_abbrev(shapes))}")
    if problems:
        raise CheckpointError(f"{where}: {subject} — " + " | ".join(problems) + f". {hint}.")


def _abbrev(items: list[str], n: int = 8) -> list[str]:
    return items if len(items) <= n else items[:n] + [f"... ({len(items) - n} more)"]


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


def _copy_from_file(
    path: Path, names: list[str], entries: dict[str, TensorEntry], params: dict[str, torch.Tensor]
) -> None:
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch wants writable memory
        try:
            for name in names:
                e, param = entries[name], params[name]
                np_dtype, torch_dtype = SAFETENSORS_DTYPES[e.dtype]
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


def read_generation_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "generation_config.json"
    return read_json(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes of '5GB', '500MB', '2GiB' or a plain number; a UserError naming the value otherwise."""
    import re

    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise CheckpointError(f"cannot read size {size!r}; write e.g. '5GB' or '500MB'")
    unit = m.group(2) or "B"
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * powers[unit])


def generation_config(
    chat: bool, endoftext_id: int, im_end_id: int, sampling: dict[str, Any] | None = None
) -> dict[str, Any]:
    """generation_config.json as Qwen1.5 ships it: chat models stop on <|im_end|> and <|endoftext|> and sample
    (`sampling` overrides CHAT_SAMPLING and may add do_sample / max_new_tokens); base models stop on
    <|endoftext|> and decode greedily."""
    if not chat:
        return {"bos_token_id": endoftext_id, "eos_token_id": endoftext_id, "do_sample": False}
    return {
        "bos_token_id": endoftext_id,
        "pad_token_id": endoftext_id,
        "eos_token_id": [im_end_id, endoftext_id],
        "do_sample": True,
        **CHAT_SAMPLING,
        **(sampling or {}),
    }


def write_hf_folder(
    path: str | os.PathLike,
    config: ModelConfig,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    read: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    generation: dict[str, Any] | None = None,
    tokenizer=None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = True,
) -> Path:
    """Write a Hugging Face folder atomically (built beside `path`, renamed when complete).

    shapes: Hugging Face name -> shape of every tensor to write, in file order; `read(names)` returns those tensors
    (any device and dtype; written as `dtype`), one output shard at a time, so a caller can produce them lazily.
    Tokenizer files come from `tokenizer` (a Tokenizer) or are copied from `tokenizer_dir`.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    with atomic_directory(path, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards):
            fname = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = read(names)
            save_file(
                {n: tensors[n].detach().to("cpu", dtype).contiguous() for n in names},
                str(tmp / fname),
                metadata={"format": "pt"},
            )
            weight_map.update(dict.fromkeys(names, fname))
            del tensors
        if len(shards) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * dtype.itemsize for s in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(tmp / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
        config.save_json(tmp / "config.json")
        if generation is not None:
            atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            _copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return Path(path)


def _copy_tokenizer_files(source: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


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
) -> Path:
    """`Qwen.save_pretrained`: the model's weights in their dtype, its config and generation config, and the
    tokenizer (given, or copied from the folder the model was loaded from)."""
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
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)
    config = model.config.replace(torch_dtype=name or model.config.torch_dtype)
    gen = generation_config or model.generation_config or default_generation_config(config)
    return write_hf_folder(
        path,
        config,
        {k: tuple(v.shape) for k, v in state.items()},
        dtype,
        lambda names: {n: state[n] for n in names},
        generation=gen,
        tokenizer=tokenizer,
        tokenizer_dir=None if tokenizer is not None else getattr(model, "source_dir", None),
        max_shard_size=max_shard_size,
    )


def default_generation_config(config: ModelConfig) -> dict[str, Any]:
    """A chat model (eos <|im_end|>) samples with the chat defaults; others decode greedily."""
    return generation_config(IM_END_ID in config.eos_token_ids, ENDOFTEXT_ID, IM_END_ID)
