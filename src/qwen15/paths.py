"""Local folders given by the user (a model, a tokenizer): resolved, or refused with a message that says what to do
(a hub name gets the download command: qwen15 never downloads)."""

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
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FolderError(missing_folder_message(str(path), what, needs))
    return folder
