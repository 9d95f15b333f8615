"""Input files of the data commands: globs expanded, files checked, and described (size, sha256) for meta.json."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any

from qwen15.errors import UserError


class DataInputError(UserError):
    """Input data that cannot be used; the message names the file (and line) and what to do."""


def expand_inputs(patterns: list[str | Path]) -> list[Path]:
    """Files named by `patterns` (paths or globs), in the order given, each glob sorted; duplicates kept once."""
    files: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataInputError(f"{text}: no file matches this pattern")
            files.extend(matches)
            continue
        path = Path(text)
        if path.is_dir():
            raise DataInputError(
                f"{path}: is a folder; name the files (a glob such as '{path}/*.jsonl' works)"
            )
        if not path.is_file():
            raise DataInputError(f"{path}: no such file")
        files.append(path)
    if not files:
        raise DataInputError("no input files given (--input)")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def describe_source(path: Path) -> dict[str, Any]:
    """Path, size and sha256 of an input file, so a dataset records exactly what it was built from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def open_text(path: Path):
    """Open a UTF-8 text file the way the seed did (universal newlines: CRLF reads as LF)."""
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise DataInputError(f"{path}: cannot be opened ({e.strerror})") from None


def decode_error(path: Path, err: UnicodeDecodeError, near_byte: int | None = None) -> DataInputError:
    where = f" near byte {near_byte}" if near_byte is not None else ""
    return DataInputError(
        f"{path}: not valid UTF-8{where} ({err.reason}); convert the file to UTF-8 (e.g. with iconv)"
    )
