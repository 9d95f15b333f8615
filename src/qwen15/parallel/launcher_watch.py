"""Workers stop when their torchrun launcher is gone.

torchrun starts each worker in a session of its own and stops them when it exits normally or is sent SIGTERM or
SIGINT, but a launcher killed with SIGKILL (or lost with its node's shell) leaves them running: they go on writing
the run directory, or wait forever on a collective. A daemon thread in every worker checks once a second that its
parent is still the launcher that started it, and ends the process (exit code 1, one line on stderr) when not.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_started = False


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def watch_launcher(interval: float = 1.0) -> None:
    """Start the watch (once per process) when this process is a torchrun worker."""
    global _started
    if _started or not launched_by_torchrun():
        return
    _started = True
    launcher = os.getppid()
    rank = os.environ.get("RANK", "?")

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != launcher:
                sys.stderr.write(
                    f"qwen15: rank {rank}: the torchrun launcher (pid {launcher}) is gone; stopping this worker. "
                    "Start the launch again to resume from the last complete checkpoint.\n"
                )
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="qwen15-launcher-watch", daemon=True).start()
