"""Local files and folders given by the user (a model, a tokenizer, a text): resolved and read, or refused with a
message that says what to do (a hub name gets the download command: qwen15 never downloads)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from qwen15.errors import UserError

_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


class FolderError(UserError):
    """A path that should be a local folder and is not."""


def missing_folder_message(path: str, what: str = "model", needs: str = "config.json + *.safetensors") -> str:
    if Path(path).exists():
        return f"{path}: is a file, not a {what} folder; pass the folder in Hugging Face layout ({needs})"
    if _HUB_NAME.fullmatch(path) and not path.startswith((".", "/")):
        return (
            f"{path!r} is not a local folder. It looks like a Hugging Face hub name; qwen15 does not download. "
            f"Download it first, e.g. `hf download {path} --local-dir ./{path.split('/')[-1]}` (older "
            f"huggingface_hub: `huggingface-cli download {path} --local-dir ./{path.split('/')[-1]}`), then pass "
            "that folder."
        )
    return f"{path}: no such {what} folder; pass a local folder in Hugging Face layout ({needs})"


def local_folder(
    path: str | os.PathLike, what: str = "model", needs: str = "config.json + *.safetensors"
) -> Path:
    """`path` as an existing folder, or a FolderError saying what is there instead and what to pass."""
    if not str(path).strip():
        raise FolderError(f"an empty path was given for the {what} folder; pass a local folder ({needs})")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FolderError(missing_folder_message(str(path), what, needs))
    return folder


def utf8_error(
    path: str | os.PathLike, data: bytes, error: UnicodeDecodeError, offset: int = 0
) -> FolderError:
    """The error for a file that is not UTF-8: file:line, the byte offset in the file, and what to do. `data` holds
    the bytes decoded, starting at byte `offset` of the file."""
    at = offset + error.start
    line = data[: error.start].count(b"\n") + 1
    return FolderError(
        f"{path}:{line}: not valid UTF-8 (byte {at} of the file: {error.reason}); convert the file to UTF-8 "
        "(e.g. with iconv)"
    )


def read_text_file(path: str | os.PathLike, flag: str) -> str:
    """The UTF-8 text of a file the user named with `flag` (missing, a folder, or not UTF-8: a message saying so)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise FolderError(f"{flag} {path}: is a folder; pass a text file")
    if file.exists() and not file.is_file():
        raise FolderError(f"{flag} {path}: is not a regular file; pass a text file")
    if not file.is_file():
        raise FolderError(f"{flag} {path}: no such file")
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(path, data, e) from None
