"""Errors caused by the user's input: the CLI prints their message (file, line or key, and what to do), no traceback.

`describe_user_os_error` is the CLI's reading of the operating system's errors about a path the user gave (a folder
that cannot be written, a file where a folder was expected ...): one line naming the path.
"""

from __future__ import annotations

import errno


class UserError(ValueError):
    """Base of every error a user can act on; subclasses name the part of the toolkit that raised it."""


_HINTS = {
    PermissionError: "not permitted; choose another path or fix its permissions",
    IsADirectoryError: "is a folder where a file was expected",
    NotADirectoryError: "a part of this path is a file, not a folder",
    FileNotFoundError: "no such file or folder",
    FileExistsError: "already exists",
}
_FULL = (errno.ENOSPC, errno.EDQUOT)


def describe_user_os_error(error: BaseException) -> str | None:
    """One line for an OS-level error about a user's path or device, or None when it is not one (then it is a bug)."""
    if isinstance(error, UnicodeDecodeError):
        return (
            f"input is not valid UTF-8 text (byte {error.start}: {error.reason}); convert the file to UTF-8 "
            "(e.g. with iconv)"
        )
    if not isinstance(error, OSError):
        return None
    if error.errno in _FULL:
        where = f"{error.filename}: " if error.filename else ""
        return (
            f"{where}no space left on the device (outputs are renamed into place only when complete, so nothing "
            "that existed was replaced); free some space and run again"
        )
    if error.errno == errno.EROFS and error.filename:
        return f"{error.filename}: read-only file system; choose a path on a writable one"
    if error.filename is None:
        return None
    name = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
    hint = next((h for cls, h in _HINTS.items() if isinstance(error, cls)), error.strerror or str(error))
    if error.strerror and hint != error.strerror:
        hint = f"{error.strerror}: {hint}"
    return f"{name}: {hint}"
