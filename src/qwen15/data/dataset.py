"""The dataset training reads: memory-mapped token rows, and a sampler that shards them across data-parallel ranks.

On-disk format (a folder written atomically by `qwen15 data preprocess`):
  meta.json      format, version, type, layout, loss_on, seq_length, rows, tokens, tokenizer_fingerprint,
                 vocab_size, pad_id, sources ...
  tokens.npy     uint32 [rows, seq_length + 1]
  loss_mask.npy  bool   [rows, seq_length + 1]  True where the token is a target (carries loss)
  doc_ids.npy    int32  [rows, seq_length + 1]  packed layout only: index of the document within its row
Row r trains inputs tokens[r, :-1] against targets tokens[r, 1:] where loss_mask[r, 1:].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen15.errors import UserError
from qwen15.model_config import IGNORE_INDEX

FORMAT = "qwen15-tokens"


class DatasetError(UserError):
    """A dataset folder that cannot be read or does not fit the model; the message says which and why."""


class TokenDataset:
    """Zero-copy view of a preprocessed dataset folder (numpy memory maps)."""

    def __init__(self, path: str | Path, *, expected_fingerprint: str | None = None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DatasetError(
                f"{self.path}: not a qwen15 dataset (no meta.json); build one with `qwen15 data preprocess`"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{meta_file}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
        if not isinstance(self.meta, dict):
            raise DatasetError(f"{meta_file}: expected a JSON object")
        if self.meta.get("format") != FORMAT:
            raise DatasetError(f"{meta_file}: format is {self.meta.get('format')!r}, expected {FORMAT!r}")
        fingerprint = self.meta.get("tokenizer_fingerprint")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise DatasetError(
                f"{self.path}: built with a different tokenizer (fingerprint {fingerprint}) than the model's "
                f"({expected_fingerprint}); preprocess the data again with the model's tokenizer"
            )
        self.tokens = self._load("tokens.npy")
        self.loss_mask = self._load("loss_mask.npy")
        self.doc_ids = self._load("doc_ids.npy") if (self.path / "doc_ids.npy").exists() else None
        seq_length = self.meta.get("seq_length")
        if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 1:
            raise DatasetError(f"{meta_file}: seq_length is {seq_length!r}, expected a positive integer")
        self.seq_length = seq_length
        for name, arr in (("tokens", self.tokens), ("loss_mask", self.loss_mask), ("doc_ids", self.doc_ids)):
            if arr is not None and arr.shape != (len(self.tokens), self.seq_length + 1):
                raise DatasetError(
                    f"{self.path}/{name}.npy: shape {arr.shape}, expected "
                    f"[{len(self.tokens)}, {self.seq_length + 1}] (seq_length {self.seq_length} + 1)"
                )

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.path / name}: cannot be read ({e})") from None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | None]:
        return {
            "tokens": self.tokens[i],
            "loss_mask": self.loss_mask[i],
            "doc_ids": None if self.doc_ids is None else self.doc_ids[i],
        }

    def batch(self, indices: list[int] | np.ndarray) -> dict[str, torch.Tensor | None]:
        """input_ids [b, S] int64, labels [b, S] int64 (IGNORE_INDEX where no loss), document_ids [b, S] or None."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx)  # sorted reads are kinder to the page cache; restore the order afterwards
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        tokens = torch.from_numpy(self.tokens[idx[order]].astype(np.int64))[inverse]
        mask = torch.from_numpy(np.asarray(self.loss_mask[idx[order]], dtype=bool))[inverse]
        labels = tokens[:, 1:].clone()
        labels[~mask[:, 1:]] = IGNORE_INDEX
        out = {"input_ids": tokens[:, :-1].contiguous(), "labels": labels, "document_ids": None}
        if self.doc_ids is not None:
            out["document_ids"] = torch.from_numpy(self.doc_ids[idx[order]].astype(np.int64))[inverse][:, :-1]
        return out


class RowSampler:
    """Deterministic order of rows for data-parallel training, resumable mid-epoch.

    The global order is the concatenation of one seeded permutation per epoch; global step t consumes the next
    `global_batch_size` rows of it (batches may straddle epochs, so every row is seen exactly once per epoch), and
    rank r takes the r-th contiguous slice of that global batch. The state is the position in the global order,
    so a run resumes with the same order under any number of ranks that divides the global batch.
    """

    def __init__(
        self,
        num_rows: int,
        global_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if num_rows <= 0:
            raise DatasetError("the dataset has no rows")
        if global_batch_size % dp_world:
            raise DatasetError(
                f"global batch size {global_batch_size} is not divisible by the {dp_world} "
                "data-parallel ranks"
            )
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.seed, self.shuffle = seed, shuffle
        self.position = 0  # rows of the global order consumed so far
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.num_rows

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._perm = np.arange(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def global_rows(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.num_rows)
            take = min(count - filled, self.num_rows - offset)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def next_batch(self) -> np.ndarray:
        """This rank's rows for the next global step (global_batch_size / dp_world of them)."""
        rows = self.global_rows(self.position, self.global_batch_size)
        self.position += self.global_batch_size
        per_rank = self.global_batch_size // self.dp_world
        return rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        return {
            "position": self.position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "global_batch_size": self.global_batch_size,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_rows"):
            if int(state[key]) != getattr(self, key):
                raise DatasetError(
                    f"cannot resume the data order: the checkpoint's {key} is {state[key]}, this "
                    f"run's is {getattr(self, key)} (same dataset and seed are needed)"
                )
        if bool(state.get("shuffle", 1)) != self.shuffle:
            raise DatasetError("cannot resume the data order: shuffle differs from the checkpoint's")
        self.position = int(state["position"])
