"""Row layouts for conversations: one per row, right-padded (the seed), or several packed whole into a row.

Packing is first-fit over a window of open rows: a conversation goes into the oldest open row that still has room
for all of it, else into a new row; when more than `window` rows are open, the oldest is closed. Conversations are
never split (an overlong one is truncated or dropped before it gets here). Each row records which conversation each
token belongs to (doc_ids 0, 1, 2 ... within the row); the padding after the last one has its own id and no loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RowSink = Callable[[np.ndarray, np.ndarray, np.ndarray | None], None]  # (tokens, loss_mask, doc_ids) rows


def pad_row(ids: np.ndarray, mask: np.ndarray, row_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One conversation right-padded to row_len; padding carries no loss (the mask comes from the length, so a
    real <|endoftext|> inside the conversation is not mistaken for padding)."""
    n = len(ids)
    tokens = np.full(row_len, pad_id, np.uint32)
    tokens[:n] = ids
    loss = np.zeros(row_len, bool)
    loss[:n] = mask
    return tokens, loss


class Packer:
    """First-fit packing of whole conversations into rows of row_len tokens (see the module notes)."""

    def __init__(self, row_len: int, pad_id: int, sink: RowSink, window: int = 512):
        self.row_len, self.pad_id, self.sink, self.window = row_len, pad_id, sink, window
        self.free = np.zeros(0, np.int64)  # room left in each open row, oldest first
        self.open: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.rows = 0
        self.documents = 0
        self.padding = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        n = len(ids)
        if not 0 < n <= self.row_len:
            raise ValueError(f"a conversation of {n} tokens cannot be packed into rows of {self.row_len}")
        fits = np.flatnonzero(self.free >= n)
        if len(fits):
            i = int(fits[0])
        else:
            if len(self.open) >= self.window:
                self._close(0)
            self.open.append([])
            self.free = np.append(self.free, self.row_len)
            i = len(self.open) - 1
        self.open[i].append((ids, mask))
        self.free[i] -= n
        self.documents += 1
        if self.free[i] == 0:
            self._close(i)

    def _close(self, i: int) -> None:
        docs = self.open.pop(i)
        room = int(self.free[i])
        self.free = np.delete(self.free, i)
        lengths = [len(ids) for ids, _ in docs]
        tokens = np.concatenate([ids for ids, _ in docs] + [np.full(room, self.pad_id, np.uint32)])
        mask = np.concatenate([m for _, m in docs] + [np.zeros(room, bool)])
        doc_ids = np.repeat(np.arange(len(docs) + 1, dtype=np.int32), lengths + [room])
        self.rows += 1
        self.padding += room
        self.sink(tokens.astype(np.uint32, copy=False), mask, doc_ids)

    def finish(self) -> None:
        while self.open:
            self._close(0)
