"""Finetuning rows from conversations: rendered with the tokenizer's chat template, loss mask from message spans.

layout "pad" (the seed): one conversation per row, truncated or right-padded with <|endoftext|> to seq_length + 1;
padding carries no loss. layout "pack": whole conversations packed into rows (qwen15.data.packing) with doc_ids, so
that training masks attention across them and restarts positions; the first token of each conversation carries no
loss there (it cannot be predicted from its own conversation).
loss_on "assistant": only assistant content and its <|im_end|> are targets; "all" (the seed): every real token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.chat_template import LOSS_MODES, ChatTemplateError
from qwen15.data.inputs import DataInputError, check_seq_length, describe_source, expand_inputs
from qwen15.data.packing import Packer, pad_row
from qwen15.data.progress import Progress
from qwen15.data.records import RecordError, SkipLog, read_records, to_messages
from qwen15.data.worker_pool import ordered_map, worker_tokenizer
from qwen15.data.writer import RowWriter, base_meta, check_output, dataset_folder, write_meta
from qwen15.tokenizer import Tokenizer

LAYOUTS = ("pad", "pack")
OVERLONG = ("truncate", "drop")
_BATCH = 128  # conversations per worker job


def encode_conversations(payload: tuple[list[list[dict[str, str]]], str]) -> list[Any]:
    """Worker: (ids uint32, loss mask bool) per conversation, or the error message of one that cannot render."""
    conversations, loss_on = payload
    tok = worker_tokenizer()
    out: list[Any] = []
    for messages in conversations:
        try:
            ids, mask = tok.encode_chat(messages, loss_on=loss_on)
        except ChatTemplateError as e:
            out.append(str(e))
            continue
        out.append((np.array(ids, np.uint32), np.array(mask, bool)))
    return out


def _jobs(files: list[Path], loss_on: str, system_prompt: str | None, skipped: SkipLog):
    """Batches of conversations ((conversations, loss_on), their "file:line") from all files, bad ones logged."""
    batch, wheres, records = [], [], 0
    for path in files:
        in_file = 0
        for rec in read_records(path):
            in_file += 1
            records += 1
            try:
                if rec.error:
                    raise RecordError(rec.error, "malformed JSON")
                messages = to_messages(rec.value, system_prompt)
                if loss_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
                    raise RecordError(
                        "no assistant message: nothing to learn with --loss-on assistant",
                        "no assistant message",
                    )
            except RecordError as e:
                skipped.add(rec.where, e)
                continue
            batch.append(messages)
            wheres.append(rec.where)
            if len(batch) == _BATCH:
                yield (batch, loss_on), wheres
                batch, wheres = [], []
        if in_file == 0:
            skipped.add(str(path), RecordError("no records (empty input)", "empty input"))
    if batch:
        yield (batch, loss_on), wheres


class _Counts:
    def __init__(self) -> None:
        self.conversations = self.truncated = self.dropped = self.no_loss = 0
        self.tokens = self.loss_tokens = self.rows = 0


def preprocess_chat(
    inputs: list[str | Path],
    output: str | Path,
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    layout: str = "pad",
    loss_on: str = "assistant",
    overlong: str = "truncate",
    system_prompt: str | None = None,
    skip_bad: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    pack_window: int = 512,
    command: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Build a `pad` or `pack` dataset folder from chat records; returns its meta.json contents."""
    for name, value, allowed in (
        ("layout", layout, LAYOUTS),
        ("loss-on", loss_on, LOSS_MODES),
        ("overlong", overlong, OVERLONG),
    ):
        if value not in allowed:
            raise DataInputError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
    check_seq_length(seq_length)
    files = expand_inputs(inputs)
    used = [*files, tokenizer.source] if tokenizer.source else files
    check_output(output, overwrite, used)
    sources = [describe_source(p) for p in files]
    row_len, pad_id = seq_length + 1, tokenizer.pad_id
    skipped, counts = SkipLog(skip_bad), _Counts()
    start = time.perf_counter()

    with dataset_folder(output, overwrite, used) as folder:
        with (
            RowWriter(folder, row_len, doc_ids=layout == "pack") as writer,
            Progress(None, "conv", quiet=quiet) as bar,
        ):

            def write_row(tokens: np.ndarray, mask: np.ndarray, doc_ids: np.ndarray | None = None) -> None:
                counts.rows += 1
                counts.loss_tokens += int(mask[1:].sum())
                writer.write(tokens[None], mask[None], None if doc_ids is None else doc_ids[None])

            packer = Packer(row_len, pad_id, write_row, pack_window) if layout == "pack" else None
            jobs = _jobs(files, loss_on, system_prompt, skipped)
            for results, wheres in ordered_map(encode_conversations, jobs, tokenizer, workers):
                for encoded, where in zip(results, wheres, strict=True):
                    if isinstance(encoded, str):
                        skipped.add(where, RecordError(encoded, "chat template error"))
                        continue
                    ids, mask = encoded
                    if len(ids) > row_len:
                        if overlong == "drop":
                            counts.dropped += 1
                            continue
                        ids, mask = ids[:row_len], mask[:row_len]
                        counts.truncated += 1
                    if packer is not None:
                        mask = mask.copy()
                        mask[0] = False  # not predictable from its own conversation
                    counts.no_loss += not mask[1:].any()
                    counts.conversations += 1
                    counts.tokens += len(ids)
                    if packer is not None:
                        packer.add(ids, mask)
                    else:
                        write_row(*pad_row(ids, mask, row_len, pad_id))
                bar.update(counts.conversations + skipped.count + counts.dropped, tokens=counts.tokens)
            if packer is not None:
                packer.finish()
        if counts.rows == 0:
            raise DataInputError(
                "no conversation left to write"
                + (f" ({skipped.count} bad records skipped)" if skipped.count else "")
                + (f" ({counts.dropped} longer than seq_length + 1 dropped)" if counts.dropped else "")
            )
        elapsed = time.perf_counter() - start
        meta = base_meta("chat", layout, seq_length, tokenizer, sources, command or [])
        meta.update(
            loss_on=loss_on,
            overlong=overlong,
            system_prompt=system_prompt,
            rows=counts.rows,
            conversations=counts.conversations,
            tokens=counts.tokens,
            padding_tokens=counts.rows * row_len - counts.tokens,
            loss_tokens=counts.loss_tokens,
            fill=round(counts.tokens / (counts.rows * row_len), 4),
            truncated=counts.truncated,
            dropped_overlong=counts.dropped,
            no_loss_conversations=counts.no_loss,
            skipped=skipped.summary(),
            workers=workers,
            seconds=round(elapsed, 2),
            tokens_per_second=round(counts.tokens / max(elapsed, 1e-9)),
        )
        write_meta(folder, meta)
    return meta
