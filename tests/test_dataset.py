"""The dataset training reads (qwen15.data.dataset) over folders written by the preprocessors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen15.data import DatasetError, RowSampler, TokenDataset
from qwen15.data.sft import preprocess_chat


def global_steps(num_rows, gbs, world, steps, seed=0):
    """Per step, the concatenation of every rank's rows (rank order)."""
    samplers = [RowSampler(num_rows, gbs, dp_rank=r, dp_world=world, seed=seed) for r in range(world)]
    return [np.concatenate([s.next_batch() for s in samplers]) for _ in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_for_any_rank_count(world):
    num_rows, gbs, epochs = 17, 6, 4
    steps = num_rows * epochs // gbs
    order = np.concatenate(global_steps(num_rows, gbs, world, steps))
    for e in range(len(order) // num_rows):
        assert sorted(order[e * num_rows : (e + 1) * num_rows].tolist()) == list(range(num_rows))
    epochs_seen = [order[e * num_rows : (e + 1) * num_rows].tolist() for e in range(2)]
    assert epochs_seen[0] != epochs_seen[1]  # reshuffled each epoch
    # the same global order whatever the number of ranks
    assert np.array_equal(order, np.concatenate(global_steps(num_rows, gbs, 1, steps)))


@pytest.mark.parametrize("world_before, world_after", [(1, 1), (2, 3), (3, 1)])
def test_resume_mid_epoch_continues_the_same_order(world_before, world_after):
    num_rows, gbs, seed = 23, 6, 7
    straight = global_steps(num_rows, gbs, 1, 12, seed)
    first = [
        RowSampler(num_rows, gbs, dp_rank=r, dp_world=world_before, seed=seed) for r in range(world_before)
    ]
    for _ in range(5):
        for s in first:
            s.next_batch()
    state = json.loads(json.dumps(first[0].state_dict()))  # survives a checkpoint file
    resumed = [
        RowSampler(num_rows, gbs, dp_rank=r, dp_world=world_after, seed=seed) for r in range(world_after)
    ]
    for s in resumed:
        s.load_state_dict(state)
    for step in range(5, 12):
        assert np.array_equal(np.concatenate([s.next_batch() for s in resumed]), straight[step])
    with pytest.raises(DatasetError, match="seed"):
        RowSampler(num_rows, gbs, seed=seed + 1).load_state_dict(state)


def _chat_dataset(tmp_path, tokenizer, layout):
    src = tmp_path / "c.jsonl"
    convs = [
        {
            "messages": [
                {"role": "user", "content": f"Q{i} " * (i + 1)},
                {"role": "assistant", "content": f"A{i}"},
            ]
        }
        for i in range(12)
    ]
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    out = tmp_path / layout
    preprocess_chat([src], out, tokenizer, seq_length=63, layout=layout, quiet=True)
    return out


@pytest.mark.parametrize("layout", ["pad", "pack"])
def test_dataset_batches_from_preprocessed_folders(tmp_path, tokenizer, layout):
    folder = _chat_dataset(tmp_path, tokenizer, layout)
    ds = TokenDataset(folder, expected_fingerprint=tokenizer.fingerprint)
    assert isinstance(ds.tokens, np.memmap) and isinstance(ds.loss_mask, np.memmap)  # zero-copy
    tokens = np.load(folder / "tokens.npy")
    mask = np.load(folder / "loss_mask.npy")
    idx = [len(ds) - 1, 0]
    batch = ds.batch(idx)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 63)
    for b, r in enumerate(idx):
        assert batch["input_ids"][b].tolist() == tokens[r, :-1].tolist()
        want = np.where(mask[r, 1:], tokens[r, 1:].astype(np.int64), -100)
        assert batch["labels"][b].tolist() == want.tolist()
    if layout == "pack":
        doc_ids = np.load(folder / "doc_ids.npy")
        assert batch["document_ids"][0].tolist() == doc_ids[idx[0], :-1].tolist()
        # no target crosses a document boundary: the first token of each document is never a label
        rows, cols = np.nonzero(np.diff(doc_ids, axis=1))
        assert len(rows) > len(ds) and not mask[rows, cols + 1].any() and not mask[:, 0].any()
    else:
        assert batch["document_ids"] is None


def test_dataset_refuses_another_tokenizer(tmp_path, tokenizer):
    folder = _chat_dataset(tmp_path, tokenizer, "pad")
    with pytest.raises(DatasetError, match="different tokenizer"):
        TokenDataset(folder, expected_fingerprint="sha256:" + "0" * 32)
    with pytest.raises(DatasetError, match="no meta.json"):
        TokenDataset(tmp_path)
