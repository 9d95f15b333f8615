"""Datasets: preprocessing (wiki, text, chat) into token rows on disk, and the memory-mapped dataset training reads.

from qwen15.data import TokenDataset, RowSampler          # what training reads (qwen15.data.dataset)
from qwen15.data import preprocess_text, preprocess_chat  # what `qwen15 data preprocess` runs
"""

from __future__ import annotations

# Imported on first use, so the preprocessing commands (and their worker processes) do not load torch.
_LAZY = {
    "DatasetError": "qwen15.data.dataset",
    "RowSampler": "qwen15.data.dataset",
    "TokenDataset": "qwen15.data.dataset",
    "DataInputError": "qwen15.data.inputs",
    "preprocess_text": "qwen15.data.pretrain",
    "preprocess_chat": "qwen15.data.sft",
    "alpaca_to_chat": "qwen15.data.records",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen15.data' has no attribute {name!r}")
