"""Tokenization jobs spread over worker processes, results returned in input order, work in flight bounded."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from qwen15.tokenizer import Tokenizer

_TOKENIZER: Tokenizer | None = None


def worker_tokenizer() -> Tokenizer:
    """The tokenizer of this process (set by `ordered_map` in-process, or by the worker initializer)."""
    if _TOKENIZER is None:
        raise RuntimeError("worker_tokenizer() called outside ordered_map")
    return _TOKENIZER


def tokenizer_spec(tok: Tokenizer) -> dict[str, Any]:
    """Everything a worker needs to rebuild the same tokenizer (pickling the Rust object is not possible)."""
    return {
        "backend": tok.backend.to_str(),
        "chat_template": tok.chat_template,
        "special_tokens": tok.special_tokens,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
    }


def _init_worker(spec: dict[str, Any], threads: int) -> None:
    # Each worker's Rust thread pool gets its share of the cores, so N workers do not oversubscribe them.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer as BackendTokenizer

    global _TOKENIZER
    _TOKENIZER = Tokenizer(
        BackendTokenizer.from_str(spec["backend"]),
        chat_template=spec["chat_template"],
        special_tokens=spec["special_tokens"],
        eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
    )


def ordered_map(
    fn: Callable[[Any], Any],
    jobs: Iterable[tuple[Any, Any]],
    tokenizer: Tokenizer,
    workers: int = 1,
    window: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield (fn(payload), tag) for each (payload, tag) of `jobs`, in order.

    workers <= 1 runs in this process. Otherwise `workers` spawned processes each rebuild the tokenizer; at most
    `window` jobs (default 2 per worker) are read ahead, so a large input is never held in memory at once.
    """
    global _TOKENIZER
    if workers <= 1:
        _TOKENIZER = tokenizer
        for payload, tag in jobs:
            yield fn(payload), tag
        return
    window = window or 2 * workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fork after the Rust tokenizer has started threads is unsafe
    with ProcessPoolExecutor(workers, ctx, _init_worker, (tokenizer_spec(tokenizer), threads)) as pool:
        pending: deque = deque()
        try:
            for payload, tag in jobs:
                pending.append((pool.submit(fn, payload), tag))
                if len(pending) >= window:
                    future, t = pending.popleft()
                    yield future.result(), t
            while pending:
                future, t = pending.popleft()
                yield future.result(), t
        finally:
            for future, _ in pending:  # on an error or an early stop, do not wait for work nobody will read
                future.cancel()
