"""One training per run directory: an exclusive lock (flock on RUN_DIR/.lock) held by rank 0 for the run's life.

A second training started on the same run directory (by mistake, or a restart while the old job still runs) would
interleave its checkpoints and metrics with the first's; it is refused at start with the holder's host and pid.
The lock goes with the process that holds it (a killed run leaves nothing to clean up). On a shared file system
flock needs lock support across machines (NFSv4, Lustre and GPFS have it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from qwen15.errors import UserError

LOCK_NAME = ".lock"


class RunDirBusy(UserError):
    """Another process holds the run directory's lock."""


class RunLock:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirBusy naming its holder; the holder's host, pid and command are written
        into the lock file for the next one to read."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another training ({holder}); two runs on one run directory "
                "would mix their checkpoints and metrics. Wait for it to finish or stop it, or choose another "
                "--train.run_dir"
            ) from None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8"))
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
