"""`preprocess --type wiki|text` against a straightforward implementation of the seed's rules (SEED.md)."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pytest

from qwen15.data.inputs import DataInputError
from qwen15.data.pretrain import preprocess_text
from qwen15.data.text_chunks import block_cut, read_chunks, text_cut
from qwen15.data.wikitext import clean_chunk, wiki_cut

from conftest import SHARED_DATA

ENDOFTEXT = 151643
WIKI_VALID = SHARED_DATA / "wikitext2_valid.tokens.txt"
WIKI_TEST = SHARED_DATA / "wikitext2_test.tokens.txt"


def seed_clean(s: str) -> str:
    """SEED.md's list, one whole-text rewrite after another."""
    s = s.replace("s '", "s'")
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    for o, c in ("()", "[]", "{}", '""', "''"):
        s = re.sub(re.escape(o) + r"\s*([^" + re.escape(c) + r"]*?)\s*" + re.escape(c), o + r"\1" + c, s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" ° ", "°")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def seed_wiki_stream(text: str, hf_tokenizer, eos_between_articles: bool = False) -> list[int]:
    ids: list[int] = []
    separator_due = False
    for para in seed_clean(text).split("\n\n"):
        stripped = para.strip()
        if eos_between_articles and re.match(r"= [^=]", stripped):
            separator_due = separator_due or bool(ids)
            continue
        if para and not stripped.startswith("="):
            if separator_due:
                ids.append(ENDOFTEXT)
                separator_due = False
            ids += hf_tokenizer(para)["input_ids"]
    return ids


def rows_of(stream: list[int], row_len: int) -> np.ndarray:
    n = len(stream) // row_len
    return np.array(stream[: n * row_len], dtype=np.int64).reshape(n, row_len)


def read_seed_style(path) -> str:
    with open(path, encoding="utf-8") as f:  # universal newlines, as the seed read it
        return f.read()


# ---------------------------------------------------------------- cleaning in chunks == cleaning the whole file

PIECES = [" ", " ", " ", "\n", "\n", " \n", "\n ", "(", ")", "[", "]", "{", "}", '"', "'", "s", "N", "a", "x",
          " @-@ ", " @,@ ", " @.@ ", "=", " = ", " ° ", ":", ";", ".", "!", "?", ",", " 's", "s '", "\t"]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_chunked_cleaning_equals_whole_file(seed):
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 400)))
        chunks = list(read_chunks(io.StringIO(text), wiki_cut, rng.randint(1, 40)))
        assert "".join(chunks) == text
        assert "".join(clean_chunk(c, i == 0) for i, c in enumerate(chunks)) == seed_clean(text)


@pytest.mark.skipif(not WIKI_VALID.is_file(), reason="shared data absent")
def test_chunked_cleaning_on_wikitext():
    text = read_seed_style(WIKI_VALID)
    chunks = list(read_chunks(io.StringIO(text), wiki_cut, 2000))
    assert len(chunks) > 100
    assert "".join(clean_chunk(c, i == 0) for i, c in enumerate(chunks)) == seed_clean(text)


WIKI_PIECES = [" = Title = \n", " = = Sec = = \n", " \n", "\n", "\n\n", " word", " 's", " ( x ) ", ' " q " ', " .", " N ",
               " @-@ ", "\u00e9", "\u6771", " '", '"', "("]  # fmt: skip


@pytest.mark.parametrize("separator", ["none", "eos"])
def test_random_wiki_seams(tmp_path, tokenizer, hf_tokenizer, separator):
    """Tiny chunks cut everywhere they may: the stitched paragraphs and separators equal the whole-file rules."""
    rng = random.Random(1)
    for trial in range(25):
        text = "".join(rng.choice(WIKI_PIECES) for _ in range(rng.randint(20, 300)))
        path = _write(tmp_path / f"r{trial}.txt", text)
        expected = seed_wiki_stream(text, hf_tokenizer, eos_between_articles=separator == "eos")
        if len(expected) < 2:
            continue
        out = tmp_path / f"o{trial}"
        preprocess_text([path], out, tokenizer, seq_length=1, doc_separator=separator,
                        chunk_chars=rng.randint(1, 60), quiet=True)  # fmt: skip
        assert np.array_equal(np.load(out / "tokens.npy"), rows_of(expected, 2)), text


def test_cut_functions_cut_where_they_say():
    assert wiki_cut("a\nb\n") == 4 and wiki_cut("a\nb\n", 4) == -1
    assert wiki_cut("a\n(b\n") == 2 and wiki_cut("(a\nb\n") == -1 and wiki_cut("(a)\nb\n") == 6
    assert wiki_cut('"a\nb"\nc') == 6 and wiki_cut("x'\ny\n") == -1
    assert text_cut("a\n b\nc") == 5 and text_cut("a\n b") == -1 and text_cut("a\nb") == 2
    assert block_cut("a\n\nb\nc\n") == 3 and block_cut("a\nb\n") == -1


# ---------------------------------------------------------------- the seed's wiki rows


@pytest.mark.skipif(not WIKI_VALID.is_file(), reason="shared data absent")
@pytest.mark.parametrize(
    "path, seq_length, chunk_chars",
    [(WIKI_VALID, 512, 1 << 22), (WIKI_VALID, 300, 3000), (WIKI_TEST, 1024, 50_000)],
)
def test_wiki_rows_equal_seed_rules(tmp_path, tokenizer, hf_tokenizer, path, seq_length, chunk_chars):
    expected_stream = seed_wiki_stream(read_seed_style(path), hf_tokenizer)
    expected = rows_of(expected_stream, seq_length + 1)
    out = tmp_path / "wiki"
    meta = preprocess_text([path], out, tokenizer, seq_length=seq_length, chunk_chars=chunk_chars, quiet=True)
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint32 and tokens.shape == expected.shape
    assert np.array_equal(tokens, expected)
    mask = np.load(out / "loss_mask.npy", mmap_mode="r")
    assert mask.shape == tokens.shape and mask.all()
    assert not (out / "doc_ids.npy").exists()
    assert meta["rows"] == len(expected) and meta["dropped_tail_tokens"] == len(expected_stream) % (
        seq_length + 1
    )
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["tokenizer_fingerprint"] == tokenizer.fingerprint and on_disk["layout"] == "rows"
    assert on_disk["sources"][0]["bytes"] == path.stat().st_size


@pytest.mark.skipif(not WIKI_VALID.is_file(), reason="shared data absent")
def test_wiki_workers_and_doc_separator(tmp_path, tokenizer, hf_tokenizer):
    stream = seed_wiki_stream(read_seed_style(WIKI_VALID), hf_tokenizer, eos_between_articles=True)
    meta = preprocess_text(
        [WIKI_VALID], tmp_path / "w2", tokenizer, seq_length=256, doc_separator="eos", workers=2,
        chunk_chars=20_000, quiet=True,
    )  # fmt: skip
    tokens = np.load(tmp_path / "w2" / "tokens.npy")
    assert np.array_equal(tokens, rows_of(stream, 257))
    # (a few of the 60 article headings are merged into a neighbour paragraph by the seed's quote trims)
    assert meta["separator_tokens"] == stream.count(ENDOFTEXT) > 50


# ---------------------------------------------------------------- plain text


def _write(path, text: str):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_text_files_are_documents(tmp_path, tokenizer, hf_tokenizer):
    rng = random.Random(0)
    words = [
        "naïve",
        "東京",
        "42",
        "x",
        "\n",
        "\n\n",
        "  ",
        "\t",
        "Hello",
        "world",
        "<|endoftext|>",
        "é",
        "\r\n",
    ]
    texts = ["".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(3000)) for _ in range(3)]
    files = [_write(tmp_path / f"doc{i}.txt", t) for i, t in enumerate(texts)]
    texts = [read_seed_style(f) for f in files]  # CRLF read as LF
    stream: list[int] = []
    for t in texts:
        stream += ([ENDOFTEXT] if stream else []) + hf_tokenizer(t)["input_ids"]
    meta = preprocess_text(
        files, tmp_path / "t", tokenizer, kind="text", seq_length=63, chunk_chars=500, quiet=True
    )
    assert np.array_equal(np.load(tmp_path / "t" / "tokens.npy"), rows_of(stream, 64))
    assert meta["separator_tokens"] == 2 and meta["doc_separator"] == "eos"


def test_text_blocks_are_documents(tmp_path, tokenizer, hf_tokenizer):
    text = "First block\nline two\n\n \n\nSecond  block\n\t\nthird\n" * 50
    f = _write(tmp_path / "blocks.txt", text)
    blocks = [b.strip("\n") for b in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text) if b.strip()]
    stream: list[int] = []
    for b in blocks:
        stream += ([ENDOFTEXT] if stream else []) + hf_tokenizer(b)["input_ids"]
    preprocess_text(
        [f],
        tmp_path / "b",
        tokenizer,
        kind="text",
        text_unit="block",
        seq_length=15,
        chunk_chars=64,
        quiet=True,
    )
    assert np.array_equal(np.load(tmp_path / "b" / "tokens.npy"), rows_of(stream, 16))
    preprocess_text(
        [f], tmp_path / "n", tokenizer, kind="text", text_unit="block", doc_separator="none", seq_length=15,
        quiet=True,
    )  # fmt: skip
    plain = [i for i in stream if i != ENDOFTEXT]
    assert np.array_equal(np.load(tmp_path / "n" / "tokens.npy"), rows_of(plain, 16))


# ---------------------------------------------------------------- bad input, atomic output


def test_too_little_text_and_bad_utf8_leave_nothing(tmp_path, tokenizer):
    small = _write(tmp_path / "small.txt", " = T = \n \n a few words . \n")
    with pytest.raises(DataInputError, match="fewer than one row"):
        preprocess_text([small], tmp_path / "out", tokenizer, seq_length=512, quiet=True)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 10 + b"\xff\xfe broken\n")
    with pytest.raises(DataInputError, match=r"bad\.txt:\d+: not valid UTF-8"):
        preprocess_text([small, bad], tmp_path / "out", tokenizer, seq_length=4, quiet=True)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind


def test_existing_output_needs_overwrite(tmp_path, tokenizer):
    f = _write(tmp_path / "a.txt", " Some text that is long enough for a few rows of tokens . \n" * 20)
    out = tmp_path / "out"
    preprocess_text([f], out, tokenizer, seq_length=8, quiet=True)
    before = (out / "tokens.npy").read_bytes()
    with pytest.raises(DataInputError, match="--overwrite"):
        preprocess_text([f], out, tokenizer, seq_length=16, quiet=True)
    assert (out / "tokens.npy").read_bytes() == before
    preprocess_text([f], out, tokenizer, seq_length=16, overwrite=True, quiet=True)
    assert np.load(out / "tokens.npy").shape[1] == 17
    with pytest.raises(DataInputError, match="no file matches"):
        preprocess_text([str(tmp_path / "*.nothing")], tmp_path / "o2", tokenizer, seq_length=8, quiet=True)
