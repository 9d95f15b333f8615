"""Input files of the data commands: globs expanded, files checked, and described (size, sha256) for meta.json."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any

from qwen15.errors import UserError


class DataInputError(UserError):
    """Input data that cannot be used; the message names the file (and line) and what to do."""


# Longest rows: far beyond any Qwen1.5 context (32768), small enough that a row buffer is a few MB, not an
# allocation of a mistyped number's size.
MAX_SEQ_LENGTH = 1 << 20


def check_seq_length(seq_length: int) -> None:
    if not 1 <= seq_length <= MAX_SEQ_LENGTH:
        raise DataInputError(f"--seq-length must lie between 1 and {MAX_SEQ_LENGTH:,}, got {seq_length:,}")


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


def first_invalid_utf8(path: Path) -> tuple[int, int, str] | None:
    """(line, byte offset, reason) of the first bytes of `path` that are not UTF-8, read in blocks; None if all are."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                # e.object is the bytes the decoder held back from the previous block (an unfinished character,
                # up to 3 bytes) followed by this block
                start = e.start - (len(e.object) - len(block))
                return line + block[: max(0, start)].count(b"\n"), offset + start, e.reason
            if not block:
                return None
            offset += len(block)
            line += block.count(b"\n")


def decode_error(path: Path, err: UnicodeDecodeError, near_byte: int | None = None) -> DataInputError:
    """The error for a file that is not UTF-8, with the line and byte offset of the first bad bytes (found by
    reading the file again: a text reader's position says nothing about where its decoder stopped)."""
    found = first_invalid_utf8(path)
    if found is None:
        where, reason = "", err.reason
    else:
        line, offset, reason = found
        where = f":{line}"
        reason = f"byte {offset} of the file: {reason}"
    return DataInputError(
        f"{path}{where}: not valid UTF-8 ({reason}); convert the file to UTF-8 (e.g. with iconv)"
    )
