"""Writing a dataset folder (the format read by qwen15.data.dataset): rows streamed to .npy files, then meta.json.

The folder is built inside `atomic_directory` (the output rule of qwen15.atomic), so a crash or a bad record never
leaves a folder that looks complete, never touches an existing one, and an --output that holds an input is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.atomic import OutputError, atomic_directory, atomic_write_text, check_output_folder
from qwen15.data.inputs import DataInputError, check_seq_length

FORMAT = "qwen15-tokens"
VERSION = 1
_HEADER_BYTES = 128  # numpy's v1 header for a 2-D array: 128 bytes whatever the row count (checked on close)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


class _NpyAppender:
    """A .npy file of shape [rows, row_len] written row block by row block; the header is filled in on close."""

    def __init__(self, path: Path, dtype: type, row_len: int):
        self.path, self.dtype, self.row_len, self.rows = path, np.dtype(dtype), row_len, 0
        self.file = open(path, "wb")  # noqa: SIM115 (stays open while rows are appended; closed by close/abort)
        self.file.write(b"\0" * _HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def abort(self) -> None:
        self.file.close()

    def close(self) -> None:
        header = _npy_header(self.dtype, (self.rows, self.row_len))
        if len(header) == _HEADER_BYTES:
            self.file.seek(0)
            self.file.write(header)
            self.file.close()
            return
        self.file.close()  # a header of another size: rewrite the file behind the right one
        tmp = self.path.with_suffix(".tmp")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            src.seek(_HEADER_BYTES)
            dst.write(header)
            shutil.copyfileobj(src, dst, 1 << 24)
        tmp.replace(self.path)


class RowWriter:
    """Appends rows (tokens, loss mask, and document ids for packed rows) to the dataset's .npy files."""

    def __init__(self, folder: Path, row_len: int, *, doc_ids: bool = False):
        self.row_len = row_len
        self.rows = 0
        self.tokens = _NpyAppender(folder / "tokens.npy", np.uint32, row_len)
        self.loss_mask = _NpyAppender(folder / "loss_mask.npy", np.bool_, row_len)
        self.doc_ids = _NpyAppender(folder / "doc_ids.npy", np.int32, row_len) if doc_ids else None

    def write(
        self, tokens: np.ndarray, loss_mask: np.ndarray | None = None, doc_ids: np.ndarray | None = None
    ):
        """Rows [k, row_len]; loss_mask None means every token is a target."""
        tokens = np.asarray(tokens).reshape(-1, self.row_len)
        self.tokens.append(tokens)
        self.loss_mask.append(np.ones(tokens.shape, bool) if loss_mask is None else loss_mask)
        if self.doc_ids is not None:
            self.doc_ids.append(doc_ids)
        self.rows += len(tokens)

    def _arrays(self) -> list[_NpyAppender]:
        return [a for a in (self.tokens, self.loss_mask, self.doc_ids) if a is not None]

    def close(self) -> None:
        """Fill in the .npy headers (the files are complete after this)."""
        for arr in self._arrays():
            arr.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for arr in self._arrays():
                arr.abort()


@contextlib.contextmanager
def dataset_folder(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary folder that becomes `path` when the block succeeds (see qwen15.atomic.atomic_directory)."""
    try:
        with atomic_directory(path, overwrite=overwrite, inputs=inputs, kind="dataset") as tmp:
            yield tmp
    except OutputError as e:
        raise DataInputError(str(e)) from None


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse early (before any work) an output that must not be written (qwen15.atomic.check_output_folder)."""
    try:
        check_output_folder(path, overwrite=overwrite, inputs=inputs)
    except OutputError as e:
        raise DataInputError(str(e)) from None


def base_meta(kind: str, layout: str, seq_length: int, tokenizer, sources: list[dict], command: list[str]):
    """The meta.json fields every dataset has; the preprocessors add their counts."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "type": kind,
        "layout": layout,
        "seq_length": seq_length,
        "row_length": seq_length + 1,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_source": tokenizer.source,
        "vocab_size": len(tokenizer),
        "pad_id": tokenizer.pad_id,
        "eos_id": tokenizer.eos_id,
        "sources": sources,
        "command": command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "qwen15_version": __import__("qwen15").__version__,
    }


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def write_documents(
    path: str | Path,
    documents: list[tuple[list[int], list[bool]]],
    *,
    seq_length: int,
    layout: str = "pack",
    pad_id: int = 0,
    overwrite: bool = False,
    **meta: Any,
) -> Path:
    """A dataset folder from token documents already in memory ((ids, loss mask) pairs), laid out as `qwen15 data
    preprocess` lays out conversations: "pack" (whole documents packed into rows, the first token of each carrying
    no loss) or "pad" (one per row, right-padded); longer documents are truncated to a row. `meta` adds keys to
    meta.json (type, vocab_size, tokenizer_fingerprint ...)."""
    from qwen15.data.packing import Packer, pad_row

    check_seq_length(seq_length)
    row_len = seq_length + 1
    with dataset_folder(path, overwrite) as folder:
        with RowWriter(folder, row_len, doc_ids=layout == "pack") as writer:
            packer = Packer(row_len, pad_id, lambda t, m, d: writer.write(t[None], m[None], d[None]))
            for ids, mask in documents:
                ids, mask = np.asarray(ids[:row_len], np.uint32), np.array(mask[:row_len], bool)
                if layout == "pack":
                    mask[0] = False  # not predictable from its own document
                    packer.add(ids, mask)
                else:
                    writer.write(*(a[None] for a in pad_row(ids, mask, row_len, pad_id)))
            packer.finish()
        tokens = sum(min(len(ids), row_len) for ids, _ in documents)
        info = {"format": FORMAT, "version": VERSION, "layout": layout, "seq_length": seq_length}
        info.update(row_length=row_len, rows=writer.rows, tokens=tokens, **meta)
        write_meta(folder, info)
    return Path(path)
