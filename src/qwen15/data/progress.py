"""Progress of long preprocessing runs: a tqdm bar on a terminal, a line every few seconds in logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """Work done out of `total` (bytes or records) with the token throughput."""

    def __init__(self, total: int | None, unit: str, *, quiet: bool = False, desc: str = "preprocess"):
        self.start = time.perf_counter()
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(
                total=total,
                unit=unit,
                unit_scale=True,
                desc=desc,
                file=sys.stderr,
                mininterval=0.5 if tty else 15.0,
                dynamic_ncols=tty,
            )

    def update(self, done: int, *, tokens: int) -> None:
        if self.bar is None:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{tokens / elapsed / 1e3:,.0f}k tokens/s", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
