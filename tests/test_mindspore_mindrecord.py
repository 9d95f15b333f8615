"""MindRecord data sets without MindSpore: our reader against mindspore.mindrecord.FileReader's rows, and the seed's
preprocessed rows (qwen1_5_preprocess.py run by make_fixtures.py) equal to what `qwen15 data preprocess` makes from
the same text, id for id."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from qwen15.cli import main
from qwen15.data.dataset import TokenDataset
from qwen15.mindspore.mindrecord import MindRecord, decode_ints

from conftest import SHARED_TOKENIZER, needs_shared

FIX = Path(__file__).parent / "fixtures" / "mindspore"
META = json.loads((FIX / "expected.json").read_text())
ARRAYS = np.load(FIX / "expected.npz")


@pytest.mark.parametrize("name", sorted(META["mindrecord"]))
def test_reader_gives_filereaders_rows(name):
    expected = META["mindrecord"][name]
    data = MindRecord(FIX / name)
    assert [s.path.name for s in data.shards] == expected["files"]
    rows = list(data.rows())
    assert len(rows) == len(data) == len(expected["rows"])
    for got, want in zip(rows, expected["rows"]):
        assert set(got) == set(want)
        for col, key in want.items():
            assert got[col].dtype == ARRAYS[key].dtype and np.array_equal(got[col], ARRAYS[key])


def test_synthetic_rows_span_pages_and_every_width():
    data = MindRecord(FIX / "synthetic.mindrecord")
    pages = {page for _, page, _, _ in data.shards[0].index}
    assert len(pages) >= 2
    values = np.concatenate([r["input_ids"] for r in data.rows()])
    assert values.min() < -(2**15) and values.max() > 2**15 and (np.abs(values) < 2**7).any()


def test_decode_ints_format():
    # count 5 (big-endian), widths 1,2,4,1 | 8 (2 bits each, MSB first), then little-endian signed values
    raw = bytes([0, 0, 0, 5, 0b00011000, 0b11000000, 0xFF, 0x2C, 0x01, 0x70, 0x11, 0x01, 0x00, 0x02]) + (
        (-(2**40)).to_bytes(8, "little", signed=True)
    )
    assert decode_ints(raw, "x").tolist() == [-1, 300, 70000, 2, -(2**40)]


@needs_shared
def test_wiki_rows_equal_our_preprocessing(tmp_path):
    assert main(["data", "from-mindrecord", str(FIX / "wiki.mindrecord"), str(tmp_path / "mr"), "--tokenizer",
                 str(SHARED_TOKENIZER), "--quiet"]) == 0  # fmt: skip
    assert main(["data", "preprocess", "--type", "wiki", "--input", str(FIX / "wiki_excerpt.txt"), "--tokenizer",
                 str(SHARED_TOKENIZER), "--seq-length", "64", "--output", str(tmp_path / "ours"), "--quiet"]) == 0  # fmt: skip
    mr, ref = TokenDataset(tmp_path / "mr"), TokenDataset(tmp_path / "ours")
    assert len(mr) == len(ref) == 20
    assert np.array_equal(mr.tokens, ref.tokens) and np.array_equal(mr.loss_mask, ref.loss_mask)
    assert mr.meta["tokenizer_fingerprint"] == ref.meta["tokenizer_fingerprint"]
    assert (mr.meta["seq_length"], mr.meta["loss_on"], mr.meta["source_format"]) == (64, "all", "mindrecord")


@needs_shared
def test_qa_rows_equal_our_preprocessing(tmp_path):
    """The seed's qa rows (ChatML, loss on every token, right-padded with <|endoftext|>) = ours with
    --loss-on all --layout pad; the two shards hold the rows in another order than the input."""
    assert main(["data", "from-mindrecord", str(FIX / "alpaca.mindrecord0"), str(tmp_path / "mr"), "--vocab-file",
                 str(SHARED_TOKENIZER / "vocab.json"), "--merges-file", str(SHARED_TOKENIZER / "merges.txt"),
                 "--quiet"]) == 0  # fmt: skip
    chat = tmp_path / "chat.jsonl"
    assert (
        main(["data", "alpaca-to-chat", "--input", str(FIX / "alpaca_excerpt.json"), "--output", str(chat)])
        == 0
    )
    assert main(["data", "preprocess", "--type", "chat", "--input", str(chat), "--tokenizer", str(SHARED_TOKENIZER),
                 "--seq-length", "96", "--loss-on", "all", "--layout", "pad", "--output", str(tmp_path / "ours"),
                 "--quiet"]) == 0  # fmt: skip
    mr, ref = TokenDataset(tmp_path / "mr"), TokenDataset(tmp_path / "ours")
    assert len(mr) == len(ref) == 8 and mr.seq_length == ref.seq_length == 96

    def rows(ds):
        return sorted((tuple(ds.tokens[i].tolist()), tuple(ds.loss_mask[i].tolist())) for i in range(len(ds)))

    assert rows(mr) == rows(ref)
    assert mr.meta["type"] == "chat" and mr.meta["padding_tokens"] == int((~ref.loss_mask).sum())
    assert any(not m[-1] for _, m in rows(mr)) and any(
        all(m) for _, m in rows(mr)
    )  # padded and truncated rows


def copy_set(tmp_path: Path, name: str) -> Path:
    for f in FIX.glob(name + "*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / name


def test_bad_mindrecords_are_refused_naming_file_and_row(tmp_path, capsys):
    tok = ["--tokenizer", str(SHARED_TOKENIZER)]
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("shared tokenizer absent")
    path = copy_set(tmp_path, "wiki.mindrecord")
    path.with_name(path.name + ".db").unlink()
    assert main(["data", "from-mindrecord", str(path), str(tmp_path / "o1"), *tok]) == 2
    assert "wiki.mindrecord.db is missing" in capsys.readouterr().err
    (tmp_path / "text.mindrecord").write_text("hello")
    assert (
        main(["data", "from-mindrecord", str(tmp_path / "text.mindrecord"), str(tmp_path / "o2"), *tok]) == 2
    )
    assert "text.mindrecord: not a MindRecord file" in capsys.readouterr().err
    assert (
        main(["data", "from-mindrecord", str(FIX / "synthetic.mindrecord"), str(tmp_path / "o3"), *tok]) == 2
    )
    assert "synthetic.mindrecord: row 0: " in capsys.readouterr().err

    # a target that is not its input: change the last value byte of row 0's target_ids
    path = copy_set(tmp_path, "alpaca.mindrecord")
    shard = tmp_path / "alpaca.mindrecord0"
    data = MindRecord(shard)
    s = data.shards[0]
    _, page, begin, end = sqlite3.connect(str(shard) + ".db").execute(
        "SELECT ROW_ID, PAGE_ID_BLOB, PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END FROM INDEXES WHERE ROW_ID = 0").fetchone()  # fmt: skip
    assert s.blob_fields[-1] == "target_ids"
    blob = bytearray(shard.read_bytes())
    pos = s.header_size + page * s.page_size + end - 1  # target_ids is the last blob field
    blob[pos] = (blob[pos] + 1) % 256
    shard.write_bytes(bytes(blob))
    assert main(["data", "from-mindrecord", str(shard), str(tmp_path / "o4"), *tok]) == 2
    assert "alpaca.mindrecord0: row 0: target_ids[" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []
