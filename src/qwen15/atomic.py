"""Atomic writes and the one rule of every writing command: a reader never sees a half-written file or folder, and
no command loses what is already there.

The rule (`atomic_directory`, `atomic_file`): an existing output is replaced only with overwrite (--overwrite), and
then only when it is something qwen15 wrote (a folder holding our marker file, a file our `looks_ours` check
accepts); an output that is, holds or sits above one of the command's inputs is refused; the output is built beside
the target (`.NAME.XXXX.partial`, marked as ours) and renamed over it when complete. Partial folders left by a
killed command are removed by the next one that writes the same output.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from qwen15.errors import UserError

MARKER = ".qwen15-output.json"  # in every folder a command writes: what wrote it (and, while partial, who)


class OutputError(UserError):
    """An output path that cannot or must not be written; the message names it and says what to do."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder` to disk, then the folders' entries."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- the output rule


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` must be a folder we can create entries in (probed, not guessed:
    permission bits say nothing for root or on read-only mounts)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another {flag}")
    try:
        probe = tempfile.mkdtemp(prefix=".qwen15-probe.", dir=ancestor)
    except OSError as e:
        raise OutputError(
            f"{flag} {path}: cannot write in {ancestor} ({e.strerror}); choose another {flag} or fix the "
            "folder's permissions"
        ) from None
    os.rmdir(probe)


def _check_inputs(path: Path, inputs: Iterable[str | os.PathLike], flag: str) -> None:
    target = _resolved(path)
    for item in inputs:
        if item is None:
            continue
        source = _resolved(item)
        if _contains(target, source):
            what = "is" if target == source else "holds"
            raise OutputError(
                f"{flag} {path} {what} this command's input {item}; writing it would delete that input. "
                f"Choose an {flag} outside the input's folder"
            )


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest first (to remove them again if the write fails)."""
    created = []
    f = folder
    while not f.exists():
        created.append(f)
        f = f.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:
        with contextlib.suppress(OSError):
            f.rmdir()


def is_ours(folder: Path) -> bool:
    """A folder some qwen15 command wrote (our marker; or a dataset's meta.json from before markers existed)."""
    if (folder / MARKER).is_file():
        return True
    meta = folder / "meta.json"
    try:
        return (
            meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == "qwen15-tokens"
        )
    except (OSError, ValueError):
        return False


def check_output_folder(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--output",
) -> Path:
    """Refuse, before any work, an output folder that this command must not write (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.name or str(path) in (".", ".."):
        path = path.resolve()
    _check_inputs(path, inputs, flag)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{flag} {path}: exists and is not a folder; choose another {flag}")
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as e:
            raise OutputError(f"{flag} {path}: cannot be read ({e.strerror})") from None
        if not empty and not overwrite:
            raise OutputError(f"{flag} {path}: exists and is not empty; pass --overwrite to replace it")
        if not empty and not is_ours(path):
            raise OutputError(
                f"{flag} {path}: exists and was not written by qwen15 (it has no {MARKER}), so --overwrite "
                f"will not replace it; choose another {flag}, or empty that folder yourself"
            )
    _check_parent(path, flag)
    return path


def _marker(partial: bool, kind: str | None) -> str:
    info = {
        "written_by": f"qwen15 {__import__('qwen15').__version__}",
        "kind": kind,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if partial:
        info.update(partial=True, host=socket.gethostname(), pid=os.getpid())
    return json.dumps(info, indent=2) + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `path` left beside it: `.NAME.*.partial` folders with our marker whose
    writer (same host) is gone, and `.NAME.*.replaced` folders (an old output caught between two renames)."""
    path = Path(path)
    parent = path.parent
    removed = []
    if not parent.is_dir():
        return removed
    for p in [*parent.glob(f".{path.name}.*.partial"), *parent.glob(f".{path.name}.*.replaced")]:
        marker = p / MARKER
        if not (p.is_dir() and not p.is_symlink() and marker.is_file()):
            continue  # not ours: leave it
        if p.name.endswith(".partial"):
            try:
                info = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", 0))):
                continue  # another machine's, or still being written
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--output",
    kind: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename, on error it is removed.

    The checks of `check_output_folder` run first (before the caller's work); the finished folder carries our
    marker, so that a later --overwrite may replace it.
    """
    path = check_output_folder(path, overwrite=overwrite, inputs=inputs, flag=flag)
    remove_stale_partials(path)
    created = _make_parents(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        (tmp / MARKER).write_text(_marker(True, kind), encoding="utf-8")
        yield tmp
        atomic_write_text(tmp / MARKER, _marker(False, kind))
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".replaced", dir=path.parent))
            os.replace(path, old)  # onto the empty folder just made: atomic, and the name is ours alone
            if not (old / MARKER).is_file():  # an empty folder or a legacy dataset: mark it for cleanup
                with contextlib.suppress(OSError):
                    (old / MARKER).write_text(_marker(False, kind), encoding="utf-8")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--output",
    looks_ours: Callable[[Path], bool] | None = None,
    what: str = "file",
) -> Path:
    """The rule for an output that is one file: as `check_output_folder`, with `looks_ours` deciding whether an
    existing file is one this command wrote."""
    path = Path(path).expanduser()
    _check_inputs(path, inputs, flag)
    if path.exists() or path.is_symlink():
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise OutputError(f"{flag} {path}: is {kind}; name a {what} to write")
        if not overwrite:
            raise OutputError(f"{flag} {path}: exists; pass --overwrite to replace it")
        if looks_ours is not None and not looks_ours(path):
            raise OutputError(
                f"{flag} {path}: exists and does not look like a {what} written by qwen15, so --overwrite will "
                f"not replace it; choose another {flag}"
            )
    _check_parent(path, flag)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, **checks) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; renamed over `path` on success (checks: check_output_file)."""
    path = check_output_file(path, **checks)
    created = _make_parents(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_empty(created)
        raise
