"""The tensors of a Hugging Face folder (or of one safetensors file) as row sources for the conversions, read by
rows through qwen15.hf_folder (which also writes the Hugging Face side)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qwen15.hf_folder import TensorEntry, read_safetensors_header, weight_entries
from qwen15.mindspore.source import RowSource


class SafetensorsTensor(RowSource):
    def __init__(self, name: str, entry: TensorEntry):
        self.name, self.where, self.dtype, self.shape = name, str(entry.file), entry.dtype, entry.shape
        self.entry = entry

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        return self.entry.read_rows(r0, r1)


def read_safetensors(path: Path) -> Iterator[SafetensorsTensor]:
    for name, entry in read_safetensors_header(path).items():
        yield SafetensorsTensor(name, entry)


def read_hf_folder(folder: Path) -> Iterator[SafetensorsTensor]:
    """The tensors of a Hugging Face folder's safetensors files (a .bin-only folder is refused: no unpickling)."""
    for name, entry in weight_entries(folder).items():
        yield SafetensorsTensor(name, entry)
