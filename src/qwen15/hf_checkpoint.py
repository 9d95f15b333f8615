"""Hugging Face checkpoints in and out: safetensors (single or sharded), memory-mapped, tied embeddings.

Loading builds the model on the meta device, allocates each parameter once in the target dtype and copies every
tensor straight from the memory-mapped file, releasing the mapped pages as it goes: peak resident memory stays
close to the size of the loaded weights, never twice the checkpoint.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen15.atomic import atomic_directory, atomic_write_text
from qwen15.errors import UserError
from qwen15.model_config import ENDOFTEXT_ID, IM_END_ID, ModelConfig

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

_DTYPES: dict[str, tuple[Any, torch.dtype]] = {
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
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(UserError):
    """A checkpoint that does not fit the model; the message names the file and the tensors concerned."""


def missing_folder_message(path: str, what: str = "model") -> str:
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        return (
            f"{path!r} is not a local folder. It looks like a Hugging Face hub name; qwen15 does not download. "
            f"Download it first, e.g. `huggingface-cli download {path} --local-dir ./{path.split('/')[-1]}` "
            f"(or `git clone https://huggingface.co/{path}`), then pass that folder."
        )
    return f"{path}: no such {what} folder; pass a local folder in Hugging Face layout (config.json + *.safetensors)"


def resolve_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(missing_folder_message(str(path)))
    return folder


# ---------------------------------------------------------------------------------------------- reading


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
    size = path.stat().st_size
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        entries[name] = TensorEntry(path, spec["dtype"], tuple(spec["shape"]), 8 + n + begin, 8 + n + end)
        if entries[name].end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} runs past the end of the file (truncated download?)"
            )
    return entries


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    if (folder / SAFE_INDEX).exists():
        index = _read_json(folder / SAFE_INDEX)
        files = sorted({folder / f for f in index.get("weight_map", {}).values()})
        if not files:
            raise CheckpointError(f"{folder / SAFE_INDEX}: 'weight_map' is empty")
        return "safetensors", files
    if (folder / SAFE_SINGLE).exists():
        return "safetensors", [folder / SAFE_SINGLE]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return "safetensors", loose
    if (folder / BIN_INDEX).exists():
        index = _read_json(folder / BIN_INDEX)
        return "bin", sorted({folder / f for f in index.get("weight_map", {}).values()})
    if (folder / BIN_SINGLE).exists():
        return "bin", [folder / BIN_SINGLE]
    raise CheckpointError(f"{folder}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face name."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators (Qwen overflows in fp16), fp32 on CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def check_names(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], tied: bool, where: str
) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming them."""
    found = {k: v for k, v in found.items() if not _IGNORED_TENSORS.search(k)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ({"lm_head.weight"} if tied else set()))
    shapes = sorted(
        f"{k}: checkpoint {list(found[k])}, model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    if (
        tied
        and "lm_head.weight" in found
        and "model.embed_tokens.weight" in expected
        and tuple(found["lm_head.weight"]) != tuple(expected["model.embed_tokens.weight"])
    ):
        shapes.append(
            f"lm_head.weight: checkpoint {list(found['lm_head.weight'])}, tied embedding "
            f"{list(expected['model.embed_tokens.weight'])}"
        )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_abbrev(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_abbrev(unexpected))}")
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(_abbrev(shapes))}")
    if problems:
        raise CheckpointError(
            f"{where}: the weights do not match config.json — "
            + " | ".join(problems)
            + ". Check that config.json belongs to these weights (a q/k/v bias or lm_head "
            "dropped by a converter shows up here)."
        )


def _abbrev(items: list[str], n: int = 8) -> list[str]:
    return items if len(items) <= n else items[:n] + [f"... ({len(items) - n} more)"]


def load_pretrained(cls, path: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    folder = resolve_folder(path)
    config = ModelConfig.from_json_file(folder / "config.json")
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    kind, files = _weight_files(folder)
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype)
    expected = {
        hf_name(k): tuple(v.shape)
        for k, v in model.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    if kind == "safetensors":
        entries: dict[str, TensorEntry] = {}
        for f in files:
            entries.update(read_safetensors_header(f))
        check_names(
            expected, {k: e.shape for k, e in entries.items()}, config.tie_word_embeddings, str(folder)
        )
        for e in entries.values():
            if e.dtype not in _DTYPES:
                raise CheckpointError(f"{e.file}: tensor dtype {e.dtype} is not supported")
        model.to_empty(device=device)
        params = {hf_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
        by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
        for name, e in entries.items():
            if name in params:
                by_file.setdefault(e.file, []).append((name, e))
        with torch.no_grad():
            for f, items in by_file.items():
                _copy_from_mmap(f, sorted(items, key=lambda kv: kv[1].begin), params)
    else:
        state = {}
        for f in files:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        check_names(
            expected, {k: tuple(v.shape) for k, v in state.items()}, config.tie_word_embeddings, str(folder)
        )
        model.to_empty(device=device)
        params = {hf_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            for name, tensor in state.items():
                if name in params:
                    params[name].copy_(tensor)
        del state
    model.tie_weights()
    if (folder / "generation_config.json").exists():
        model.generation_config = _read_json(folder / "generation_config.json")
    model.source_dir = str(folder)
    return model.eval()


def _copy_from_mmap(
    path: Path, items: list[tuple[str, TensorEntry]], params: dict[str, torch.Tensor]
) -> None:
    """Copy tensors out of the mapped file in slices of at most _CHUNK bytes, dropping each slice's pages after."""
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            for name, e in items:
                np_dtype, torch_dtype = _DTYPES[e.dtype]
                itemsize = np.dtype(np_dtype).itemsize
                dest = params[name]
                rows = e.shape[0] if e.shape else 1
                row_bytes = (e.end - e.begin) // max(rows, 1)
                step = max(1, _CHUNK // max(row_bytes, 1))
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    begin, end = e.begin + r0 * row_bytes, e.begin + r1 * row_bytes
                    array = np.frombuffer(mm, dtype=np_dtype, count=(end - begin) // itemsize, offset=begin)
                    shape = (r1 - r0, *e.shape[1:]) if e.shape else ()
                    src = torch.from_numpy(array).view(torch_dtype).view(shape)
                    (dest[r0:r1] if e.shape else dest).copy_(src)
                    del src, array
                    start = (begin // page) * page
                    if end > start:
                        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        finally:
            mm.close()


_CHUNK = 64 * 2**20


# ---------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. '5GB' or '500MB'")
    unit = m.group(2) or "B"
    powers = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(m.group(1)) * powers[unit])


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names; a tied lm_head is left out (as transformers expects)."""
    tied = model.config.tie_word_embeddings
    return {hf_name(k): v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def default_generation_config(config: ModelConfig) -> dict[str, Any]:
    """What Qwen1.5 checkpoints ship: Chat models stop on <|im_end|> and <|endoftext|> and sample."""
    if IM_END_ID in config.eos_token_ids:
        return {
            "bos_token_id": ENDOFTEXT_ID,
            "pad_token_id": ENDOFTEXT_ID,
            "do_sample": True,
            "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
            "repetition_penalty": 1.1,
            "top_p": 0.8,
            "top_k": 20,
            "temperature": 0.7,
        }
    return {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID, "do_sample": False}


def save_state_dict(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    tokenizer_source: str | None = None,
    max_shard_size: int | str = "5GB",
    generation_config: dict[str, Any] | None = None,
) -> None:
    """Write a Hugging Face folder from full (unsharded) tensors under Hugging Face names, atomically."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    with atomic_directory(path) as tmp:
        if len(shards) == 1:
            save_file(_contiguous_cpu(shards[0]), str(tmp / SAFE_SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(_contiguous_cpu(shard), str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            atomic_write_text(
                tmp / SAFE_INDEX,
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            )
        config.save_json(tmp / "config.json")
        gen = generation_config or default_generation_config(config)
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_source is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_source) / name).is_file():
                    shutil.copyfile(Path(tokenizer_source) / name, tmp / name)


def _contiguous_cpu(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}


def save_pretrained(
    model,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    generation_config: dict[str, Any] | None = None,
) -> None:
    config = model.config
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        next(model.parameters()).dtype, config.torch_dtype
    )
    config = config.replace(torch_dtype=dtype_name)
    save_state_dict(
        hf_state_dict(model),
        config,
        path,
        tokenizer=tokenizer,
        tokenizer_source=getattr(model, "source_dir", None),
        max_shard_size=max_shard_size,
        generation_config=generation_config or model.generation_config,
    )
