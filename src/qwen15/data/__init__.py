"""Datasets: preprocessing (wiki, text, chat) into token rows on disk, and the memory-mapped dataset training reads."""

from qwen15.data.dataset import DatasetError, RowSampler, TokenDataset

__all__ = ["DatasetError", "RowSampler", "TokenDataset"]
