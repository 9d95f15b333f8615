"""Tensors read by rows (`RowSource`), written from row blocks (qwen15.hf_folder.OutTensor), so that a conversion
holds a block of rows in memory, never a whole file.

Every reader here (a .ckpt file, per-rank slices merged by a strategy, a safetensors file) gives its tensors as a
`RowSource`: dtype, shape and `read_rows(r0, r1)` in the stored dtype (bfloat16 as uint16 bits).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from qwen15.mindspore.dtypes import convert, itemsize, storage

BLOCK_BYTES = 32 * 2**20  # rows read at a time: bounds the memory of a conversion


class RowSource:
    name: str
    dtype: str
    shape: tuple[int, ...]
    where: str  # the file, for messages

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        raise NotImplementedError

    def read(self) -> np.ndarray:
        return self.read_rows(0, self.rows).reshape(self.shape)


def row_blocks(
    src: RowSource, rows: np.ndarray | None, dtype: str, block_bytes: int = BLOCK_BYTES
) -> Iterator[np.ndarray]:
    """Rows `rows` of `src` (all of them when None) in order, converted to `dtype`, a block at a time.

    A block reads the span from its first to its last wanted row: contiguous selections read nothing extra, the
    strided ones of a fused layout at most the fused tensor's rows in that span.
    """
    count = src.rows if rows is None else len(rows)
    row_bytes = max(1, math.prod(src.row_shape) * max(itemsize(src.dtype), itemsize(dtype)))
    step = max(1, block_bytes // row_bytes)
    for a in range(0, count, step):
        b = min(count, a + step)
        if rows is None:
            block = src.read_rows(a, b)
        else:
            want = rows[a:b]
            lo, hi = int(want.min()), int(want.max()) + 1
            span = src.read_rows(lo, hi)
            block = span if hi - lo == len(want) and (np.diff(want) == 1).all() else span[want - lo]
        yield convert(block, src.dtype, dtype)


def empty_rows(dtype: str, shape: tuple[int, ...], r0: int, r1: int) -> np.ndarray:
    return np.empty((r1 - r0, *shape[1:]), storage(dtype))
