"""Small in-memory token documents -> a dataset folder in the format qwen15.data.dataset.TokenDataset reads.

The demo builds its data in memory (a few thousand short documents), so it writes the on-disk format directly:
  pack   whole documents placed greedily into rows of seq_length + 1 (never split), with doc_ids so attention and
         positions restart per document; the first token of each document carries no loss (nothing in its own
         document predicts it); leftover slots are padding (no loss, their own document id)
  pad    one document per row, truncated to seq_length + 1, right-padded
  stream one token stream cut into rows of seq_length + 1 (pretraining text; every token carries loss)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.atomic import atomic_directory
from qwen15.data.dataset import FORMAT

Document = tuple[list[int], list[bool]]  # token ids and their loss mask


def pack_documents(docs: list[Document], seq_length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    width = seq_length + 1
    rows: list[list[Document]] = []
    used: list[int] = []
    for ids, mask in docs:
        if len(ids) > width:
            ids, mask = ids[:width], mask[:width]
        # first row with room (first-fit keeps the order roughly and wastes little)
        for r in range(max(0, len(rows) - 8), len(rows)):
            if used[r] + len(ids) <= width:
                rows[r].append((ids, mask))
                used[r] += len(ids)
                break
        else:
            rows.append([(ids, mask)])
            used.append(len(ids))
    tokens = np.full((len(rows), width), pad_id, dtype=np.uint32)
    loss = np.zeros((len(rows), width), dtype=bool)
    doc_ids = np.zeros((len(rows), width), dtype=np.int32)
    for r, row in enumerate(rows):
        t = 0
        for d, (ids, mask) in enumerate(row):
            tokens[r, t : t + len(ids)] = ids
            loss[r, t : t + len(ids)] = mask
            loss[r, t] = False
            doc_ids[r, t : t + len(ids)] = d
            t += len(ids)
        doc_ids[r, t:] = len(row)
    return tokens, loss, doc_ids


def pad_documents(docs: list[Document], seq_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = seq_length + 1
    tokens = np.full((len(docs), width), pad_id, dtype=np.uint32)
    loss = np.zeros((len(docs), width), dtype=bool)
    for r, (ids, mask) in enumerate(docs):
        ids, mask = ids[:width], mask[:width]
        tokens[r, : len(ids)] = ids
        loss[r, : len(ids)] = mask
    return tokens, loss


def stream_rows(ids: list[int], seq_length: int) -> np.ndarray:
    width = seq_length + 1
    n = len(ids) // width
    return np.asarray(ids[: n * width], dtype=np.uint32).reshape(n, width)


def write_dataset(
    folder: str | Path,
    tokens: np.ndarray,
    loss_mask: np.ndarray | None = None,
    doc_ids: np.ndarray | None = None,
    **meta: Any,
) -> Path:
    """Write the folder atomically. `meta` adds keys to meta.json (type, layout, tokenizer_fingerprint ...)."""
    if loss_mask is None:
        loss_mask = np.ones(tokens.shape, dtype=bool)
    info = {
        "format": FORMAT,
        "version": 1,
        "seq_length": int(tokens.shape[1] - 1),
        "rows": int(tokens.shape[0]),
        "tokens": int(tokens.size),
        "layout": "pack" if doc_ids is not None else meta.pop("layout", "pad"),
        **meta,
    }
    with atomic_directory(folder) as tmp:
        np.save(tmp / "tokens.npy", tokens.astype(np.uint32))
        np.save(tmp / "loss_mask.npy", loss_mask.astype(bool))
        if doc_ids is not None:
            np.save(tmp / "doc_ids.npy", doc_ids.astype(np.int32))
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Path(folder)
