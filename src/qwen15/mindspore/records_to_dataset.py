"""MindRecord rows of the seed's preprocessing -> a qwen15 dataset folder (the format `qwen15 train` reads).

Schemas: `input_ids` alone (the seed's wiki rows: every token a target) and `input_ids` + `target_ids` (+
`attention_mask`) (its qa rows: targets are the inputs with padding set to -100). Rows and ids are kept exactly;
loss_mask is `target_ids != -100`. Rows whose targets are not their inputs cannot be expressed in our format
(training shifts the inputs by one itself) and are refused, as are rows of different lengths.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.data.inputs import DataInputError, describe_source
from qwen15.data.progress import Progress
from qwen15.data.writer import RowWriter, base_meta, check_output, dataset_folder, write_meta
from qwen15.mindspore.mindrecord import MindRecord

IGNORE = -100
_BATCH = 1024


def mindrecord_to_dataset(
    path: str | Path, output: str | Path, tokenizer, *, overwrite: bool = False, command=None, quiet=False
) -> dict[str, Any]:
    check_output(output, overwrite)
    start = time.perf_counter()
    data = MindRecord(path)
    target = Path(output).resolve()
    if any(target == f.resolve() or target in f.resolve().parents for f in data.files()):
        raise DataInputError(f"{output}: holds the input {path}; write the dataset somewhere else")
    fields = set(data.fields)
    if fields == {"input_ids"}:
        kind, layout = "text", "rows"
    elif fields in ({"input_ids", "target_ids"}, {"input_ids", "target_ids", "attention_mask"}):
        kind, layout = "chat", "pad"
    else:
        raise DataInputError(
            f"{path}: fields {sorted(fields)}; qwen15 reads the seed's schemas: input_ids (pretraining rows) or "
            "input_ids, target_ids, attention_mask (finetuning rows)"
        )
    vocab = len(tokenizer)
    stream = data.rows()
    first = next(stream, None)
    if first is None:
        raise DataInputError(f"{path}: no rows")
    row_len = len(first["input_ids"])
    if row_len < 2:
        raise DataInputError(f"{path}: row 0 has {row_len} token(s); a training row needs at least 2")
    rows = loss_tokens = padding = 0
    with (
        dataset_folder(output, overwrite, inputs=data.files()) as folder,
        RowWriter(folder, row_len) as writer,
        Progress(len(data), "rows", quiet=quiet, desc="from-mindrecord") as bar,
    ):
        for i, row in enumerate(itertools.chain([first], stream)):
            ids, where = row["input_ids"], f"{path}: row {i}"
            if len(ids) != row_len:
                raise DataInputError(
                    f"{where}: {len(ids)} tokens where the rows before have {row_len}; qwen15 datasets hold "
                    "rows of one length (seq_length + 1)"
                )
            if ids.min() < 0 or ids.max() >= vocab:
                bad = int(ids.min() if ids.min() < 0 else ids.max())
                raise DataInputError(
                    f"{where}: token id {bad} is outside the tokenizer's {vocab} ids; pass the tokenizer the data "
                    "was made with"
                )
            mask = _loss_mask(row, where) if kind == "chat" else np.ones(row_len, bool)
            padding += int((~mask).sum())
            loss_tokens += int(mask[1:].sum())
            writer.write(ids.astype(np.uint32)[None], mask[None])
            rows += 1
            if rows % _BATCH == 0:
                bar.update(rows, tokens=rows * row_len)
        bar.update(rows, tokens=rows * row_len)
        seconds = time.perf_counter() - start
        sources = [describe_source(p) for p in data.files()]
        meta = base_meta(kind, layout, row_len - 1, tokenizer, sources, command or [])
        meta.update(
            loss_on="all",
            source_format="mindrecord",
            mindrecord_fields=sorted(fields),
            rows=rows,
            tokens=rows * row_len - padding,
            padding_tokens=padding,
            loss_tokens=loss_tokens,
            seconds=round(seconds, 2),
            tokens_per_second=round(rows * row_len / max(seconds, 1e-9)),
        )
        write_meta(folder, meta)
    return meta


def _loss_mask(row: dict[str, np.ndarray], where: str) -> np.ndarray:
    ids, targets = row["input_ids"], row["target_ids"]
    if len(targets) != len(ids):
        raise DataInputError(f"{where}: target_ids has {len(targets)} ids, input_ids {len(ids)}")
    mask = targets != IGNORE
    differ = np.flatnonzero(mask & (targets != ids))
    if len(differ):
        j = int(differ[0])
        raise DataInputError(
            f"{where}: target_ids[{j}] = {int(targets[j])} but input_ids[{j}] = {int(ids[j])}; the seed's rows have "
            "targets equal to the inputs (or -100), which is what qwen15's format can hold"
        )
    if "attention_mask" in row:
        attended = row["attention_mask"] != 0
        if (mask & ~attended).any():
            j = int(np.flatnonzero(mask & ~attended)[0])
            raise DataInputError(f"{where}: position {j} is a target but has attention_mask 0")
    return mask
