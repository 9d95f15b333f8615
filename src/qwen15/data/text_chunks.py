"""Reading large text files in chunks that can be processed independently (memory stays bounded).

A chunk ends only at a cut chosen by a `cut(text, lo) -> int` function (the last acceptable cut after position lo,
or -1): `wiki_cut` for WikiText, `text_cut` and `block_cut` below for plain text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TextIO

CutFn = Callable[[str, int], int]
DEFAULT_CHUNK_CHARS = 4 << 20


def read_chunks(f: TextIO, cut: CutFn, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[str]:
    """Consecutive chunks of the file, each about chunk_chars long, that together are exactly the file's text.

    A chunk grows past chunk_chars while no acceptable cut exists (for WikiText, an unpaired quote can delay the
    next cut: exactness wins over memory then).
    """
    buf = ""
    rejected_upto = 0  # cuts at or before this position of buf were already refused
    while True:
        block = f.read(chunk_chars)
        if not block:
            if buf:
                yield buf
            return
        buf += block
        if len(buf) < chunk_chars:
            continue
        e = cut(buf, rejected_upto)
        if e <= 0:
            rejected_upto = len(buf)
            continue
        yield buf[:e]
        buf = buf[e:]
        rejected_upto = 0


def _starts_pretoken(ch: str) -> bool:
    # After a newline, a letter, digit or visible ASCII character always begins a new pre-token of the Qwen split
    # (only whitespace can join a newline run), so text cut there tokenizes exactly as the whole.
    return ch.isalnum() or (ch.isascii() and ch.isprintable() and ch != " ")


def text_cut(text: str, lo: int = 0) -> int:
    """The last cut > lo just after a newline that is followed by a character starting a pre-token; -1 if none."""
    end = len(text) - 1  # the character after the cut must be known
    while True:
        nl = text.rfind("\n", lo, end)
        if nl < 0:
            return -1
        if _starts_pretoken(text[nl + 1]):
            return nl + 1
        end = nl


def block_cut(text: str, lo: int = 0) -> int:
    """The last cut > lo just after a blank (whitespace-only) line, so blank-line blocks never straddle chunks."""
    end = len(text)
    while True:
        nl = text.rfind("\n", lo, end)
        if nl < 0:
            return -1
        start = text.rfind("\n", 0, nl) + 1
        if not text[start:nl].strip():
            return nl + 1
        end = nl


def split_pieces(text: str, max_chars: int) -> list[str]:
    """`text` split at `text_cut`-style points into pieces of about max_chars (to batch-encode them in parallel)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        nl = text.find("\n", start + max_chars)
        while 0 <= nl < len(text) - 1 and not _starts_pretoken(text[nl + 1]):
            nl = text.find("\n", nl + 1)
        if not 0 <= nl < len(text) - 1:
            break
        pieces.append(text[start : nl + 1])
        start = nl + 1
    pieces.append(text[start:])
    return pieces
