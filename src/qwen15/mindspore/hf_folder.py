"""Hugging Face folders in and out, tensor by tensor: safetensors read by rows, and written as a stream.

Converting never holds more than a block of rows: the output's header is written from the tensors' shapes first,
then each tensor's bytes as they are produced. (checkpoint.save_state_dict takes a state dict in memory, which
for a 0.5B checkpoint is its whole size; this module is the one place the migration writes Hugging Face folders.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from qwen15.atomic import atomic_directory, atomic_write_text
from qwen15.config import ModelConfig
from qwen15.errors import UserError
from qwen15.mindspore.dtypes import DTYPES, FROM_SAFETENSORS, itemsize, storage
from qwen15.mindspore.source import OutTensor, RowSource, empty_rows


def write_safetensors(path: Path, tensors: list[OutTensor], on_bytes: Callable[[int], None]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPES[t.dtype][2],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors:
            written = 0
            for block in t.blocks():
                data = np.ascontiguousarray(block, storage(t.dtype)).reshape(-1).view(np.uint8)
                f.write(data)
                written += data.nbytes
                on_bytes(data.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")


def write_hf_folder(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    tensors: list[OutTensor],
    *,
    tokenizer_source: Path | None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Path:
    """config.json, generation_config.json, model(-0000N-of-0000M).safetensors (+ index), tokenizer files."""
    from qwen15.checkpoint import (
        SAFE_INDEX,
        SAFE_SINGLE,
        TOKENIZER_FILES,
        default_generation_config,
        parse_size,
    )

    limit = parse_size(max_shard_size)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = (
                    SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                write_safetensors(tmp / name, shard, on_bytes)
                weight_map.update(dict.fromkeys((t.name for t in shard), name))
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
                atomic_write_text(tmp / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
            config.save_json(tmp / "config.json")
            gen = default_generation_config(config)
            atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
            if tokenizer_source is not None:
                for fname in TOKENIZER_FILES:
                    if (tokenizer_source / fname).is_file():
                        shutil.copyfile(tokenizer_source / fname, tmp / fname)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    return Path(out_dir)


class SafetensorsTensor(RowSource):
    def __init__(self, name: str, path: Path, dtype: str, shape: tuple[int, ...], begin: int):
        self.name, self.where, self.dtype, self.shape, self.begin = name, str(path), dtype, shape, begin
        self.path = path

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        out = empty_rows(self.dtype, self.shape, r0, r1)
        row_bytes = math.prod(self.row_shape) * itemsize(self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(self.begin + r0 * row_bytes)
            if f.readinto(buf) != len(buf):
                raise UserError(f"{self.path}: tensor {self.name!r} is cut off (truncated file?)")
        return out


def read_safetensors(path: Path) -> Iterator[SafetensorsTensor]:
    from qwen15.checkpoint import read_safetensors_header

    for name, e in read_safetensors_header(path).items():
        if e.dtype not in FROM_SAFETENSORS:
            raise UserError(f"{path}: tensor {name!r} has dtype {e.dtype}, which qwen15 does not convert")
        yield SafetensorsTensor(name, path, FROM_SAFETENSORS[e.dtype], e.shape, e.begin)


def read_hf_folder(folder: Path) -> Iterator[SafetensorsTensor]:
    """The tensors of a Hugging Face folder's safetensors files (a .bin-only folder is refused: no unpickling)."""
    from qwen15.checkpoint import SAFE_INDEX

    if (folder / SAFE_INDEX).is_file():
        index = json.loads((folder / SAFE_INDEX).read_text(encoding="utf-8"))
        files = sorted({folder / f for f in index.get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{folder}: no *.safetensors weights (qwen15 does not unpickle .bin files; convert them with "
            "transformers' save_pretrained(safe_serialization=True) first)"
        )
    for f in files:
        yield from read_safetensors(f)
