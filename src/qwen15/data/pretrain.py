"""Pretraining rows from WikiText (the seed's rules) or plain text: one token stream cut into rows of seq_length + 1.

wiki: each file is cleaned (`clean_wikitext`), split on blank lines into paragraphs, empty paragraphs and headings
dropped, each paragraph tokenized on its own, the token lists concatenated with nothing between them, and the
stream cut into rows of seq_length + 1 tokens; the last partial row is dropped. `doc_separator="eos"` puts an
<|endoftext|> between articles (an article starts at a top-level heading) and between files.
text: no cleaning; a document is a whole file (`text_unit="file"`) or a blank-line block (`"block"`); documents are
joined by <|endoftext|> unless doc_separator="none".

Files are read in chunks (about 4 M characters) that workers clean and tokenize independently; the seams are
stitched here so that the ids equal those of the whole-file procedure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.data.inputs import (
    DataInputError,
    check_seq_length,
    decode_error,
    describe_source,
    expand_inputs,
    open_text,
)
from qwen15.data.progress import Progress
from qwen15.data.text_chunks import DEFAULT_CHUNK_CHARS, block_cut, read_chunks, split_pieces, text_cut
from qwen15.data.wikitext import PARAGRAPH_SEPARATOR, clean_chunk, is_article_heading, is_heading, wiki_cut
from qwen15.data.worker_pool import ordered_map, worker_tokenizer
from qwen15.data.writer import RowWriter, base_meta, check_output, dataset_folder, write_meta
from qwen15.tokenizer import Tokenizer

TYPES = ("wiki", "text")
TEXT_UNITS = ("file", "block")
SEPARATORS = ("none", "eos")
_EMPTY = np.zeros(0, np.uint32)
_NO_STARTS = np.zeros(0, np.int64)


@dataclass
class ChunkTokens:
    """A worker's answer for one chunk.

    wiki: `head` is the chunk's text up to its first paragraph separator that is certain whatever precedes the
    chunk (`synced`); the caller joins it to the text carried from the previous chunk. `tokens` hold the complete
    paragraphs after it, `tail` the last, possibly unfinished, paragraph. text: only `tokens`.
    `doc_starts`: positions in `tokens` where a document (article, block) starts.
    """

    tokens: np.ndarray = field(default_factory=lambda: _EMPTY)
    doc_starts: np.ndarray = field(default_factory=lambda: _NO_STARTS)
    head: str = ""
    synced: bool = True
    tail: str = ""


def paragraph_tokens(tok: Tokenizer, paragraphs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The seed's paragraph rule: drop '' and headings, tokenize each of the others on its own, concatenate.

    Returns the tokens and the positions where an article (top-level heading) starts.
    """
    texts: list[str] = []
    starts_at: list[int] = []  # index in texts of the first paragraph after an article heading
    for p in paragraphs:
        if not p:
            continue
        if is_heading(p):
            if is_article_heading(p):
                starts_at.append(len(texts))
            continue
        texts.append(p)
    return _encode_concat(tok, texts, starts_at)


def _encode_concat(tok: Tokenizer, texts: list[str], starts_at: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each text tokenized on its own (in parallel inside the Rust tokenizer), the ids concatenated."""
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which are not needed here
    encode = getattr(tok.backend, "encode_batch_fast", tok.backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False) if texts else []
    arrays = [np.array(e.ids, dtype=np.uint32) for e in encodings]
    tokens = np.concatenate(arrays) if arrays else _EMPTY
    if not starts_at:
        return tokens, _NO_STARTS
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)])
    return tokens, offsets[np.asarray(starts_at, np.int64)]


def tokenize_chunk(job: tuple[str, str, bool]) -> ChunkTokens:
    """Worker: clean (wiki), split and tokenize one chunk of a file."""
    kind, text, first = job
    tok = worker_tokenizer()
    if kind == "wiki":
        cleaned = clean_chunk(text, first)
        # A separator found after the chunk's first non-newline character is found whatever came before it.
        body_start = len(cleaned) - len(cleaned.lstrip("\n"))
        sep = cleaned.find(PARAGRAPH_SEPARATOR, body_start)
        if sep < 0:
            return ChunkTokens(head=cleaned, synced=False)
        paragraphs = cleaned[sep + len(PARAGRAPH_SEPARATOR) :].split(PARAGRAPH_SEPARATOR)
        tail = paragraphs.pop()
        tokens, starts = paragraph_tokens(tok, paragraphs)
        return ChunkTokens(tokens, starts, head=cleaned[:sep], tail=tail)
    if kind == "block":
        blocks, lines = [], []
        for line in text.split("\n"):  # "\n" only: a form feed or U+2028 inside a line does not end it
            if line.strip():
                lines.append(line)
            elif lines:
                blocks.append("\n".join(lines))
                lines = []
        if lines:
            blocks.append("\n".join(lines))
        tokens, starts = _encode_concat(tok, blocks, list(range(len(blocks))))
        return ChunkTokens(tokens, starts)
    # kind == "file": one document; pieces cut where tokenization is compositional, encoded in parallel
    tokens, _ = _encode_concat(tok, split_pieces(text, 1 << 16), [])
    return ChunkTokens(tokens)


class RowStream:
    """Tokens in, rows of row_len out; a separator token goes between documents when asked for."""

    def __init__(self, writer: RowWriter, row_len: int, separator_id: int | None):
        self.writer, self.row_len, self.separator_id = writer, row_len, separator_id
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.total = 0  # tokens in the stream so far (separators included)
        self.separators = 0
        self._separator_due = False

    def document_start(self) -> None:
        if self.separator_id is not None and self.total:
            self._separator_due = True

    def add(self, tokens: np.ndarray, doc_starts: np.ndarray = _NO_STARTS) -> None:
        prev = 0
        for p in doc_starts:
            self._append(tokens[prev:p])
            self.document_start()
            prev = p
        self._append(tokens[prev:])

    def _append(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        if self._separator_due:
            self._separator_due = False
            self._push(np.array([self.separator_id], np.uint32))
            self.separators += 1
        self._push(tokens)

    def _push(self, tokens: np.ndarray) -> None:
        self.parts.append(tokens)
        self.buffered += len(tokens)
        self.total += len(tokens)
        if self.buffered >= max(self.row_len, 1 << 20):
            self._flush()

    def _flush(self) -> None:
        stream = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        full = len(stream) // self.row_len * self.row_len
        if full:
            self.writer.write(stream[:full])
        self.parts = [stream[full:]] if full < len(stream) else []
        self.buffered = len(stream) - full

    def finish(self) -> int:
        """Write the remaining full rows; return the number of tokens left over (the dropped partial row)."""
        if self.parts:
            self._flush()
        return self.buffered


def _chunk_jobs(files: list[Path], kind: str, chunk_chars: int):
    """(payload, tag) jobs; tag = (file index, is last chunk of the file, bytes read so far)."""
    cut = {"wiki": wiki_cut, "block": block_cut, "file": text_cut}[kind]
    done_bytes = 0
    for index, path in enumerate(files):
        size = path.stat().st_size
        with open_text(path) as f:
            chunks = read_chunks(f, cut, chunk_chars)
            first = True
            try:
                chunk = next(chunks, None)
                while chunk is not None:
                    following = next(chunks, None)
                    position = done_bytes + (size if following is None else min(size, f.buffer.tell()))
                    yield (kind, chunk, first), (index, following is None, position)
                    first = False
                    chunk = following
            except UnicodeDecodeError as e:
                raise decode_error(path, e, f.buffer.tell()) from None
        if first:  # an empty file still ends (and starts) a document
            yield (kind, "", True), (index, True, done_bytes + size)
        done_bytes += size


def _tokenize_files(
    files: list[Path],
    job_kind: str,
    chunk_chars: int,
    tokenizer: Tokenizer,
    workers: int,
    stream: RowStream,
    progress: Progress,
) -> None:
    """Chunks tokenized by the workers, seams stitched here (wiki), all in file order into `stream`."""
    carry, current = "", -1
    jobs = _chunk_jobs(files, job_kind, chunk_chars)
    for result, (index, last, position) in ordered_map(tokenize_chunk, jobs, tokenizer, workers):
        if index != current:  # a new file: a new document, nothing carried over
            current, carry = index, ""
            stream.document_start()
        if job_kind == "wiki":
            paragraphs = (carry + result.head).split(PARAGRAPH_SEPARATOR)
            carry = result.tail if result.synced else paragraphs.pop()
            stream.add(*paragraph_tokens(tokenizer, paragraphs))
        stream.add(result.tokens, result.doc_starts)
        if job_kind == "wiki" and last:
            stream.add(*paragraph_tokens(tokenizer, [carry]))
            carry = ""
        progress.update(position, tokens=stream.total)


def preprocess_text(
    inputs: list[str | Path],
    output: str | Path,
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    kind: str = "wiki",
    doc_separator: str | None = None,
    text_unit: str = "file",
    workers: int = 1,
    overwrite: bool = False,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    command: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Build a `rows` dataset folder from WikiText or plain text files; returns its meta.json contents."""
    if kind not in TYPES:
        raise DataInputError(f"type must be one of {TYPES}, got {kind!r}")
    check_seq_length(seq_length)
    if text_unit not in TEXT_UNITS:
        raise DataInputError(f"--text-unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    doc_separator = doc_separator or ("none" if kind == "wiki" else "eos")
    if doc_separator not in SEPARATORS:
        raise DataInputError(f"--doc-separator must be one of {SEPARATORS}, got {doc_separator!r}")
    files = expand_inputs(inputs)
    used = [*files, tokenizer.source] if tokenizer.source else files
    check_output(output, overwrite, used)
    sources = [describe_source(p) for p in files]
    row_len = seq_length + 1
    job_kind = "wiki" if kind == "wiki" else text_unit
    separator_id = tokenizer.endoftext_id if doc_separator == "eos" else None
    start = time.perf_counter()

    with dataset_folder(output, overwrite, used) as folder:
        with (
            RowWriter(folder, row_len) as writer,
            Progress(sum(s["bytes"] for s in sources), "B", quiet=quiet) as bar,
        ):
            stream = RowStream(writer, row_len, separator_id)
            _tokenize_files(files, job_kind, chunk_chars, tokenizer, workers, stream, bar)
            leftover = stream.finish()
        if writer.rows == 0:
            names = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataInputError(
                f"{names}: {stream.total} tokens, fewer than one row of seq_length + 1 = {row_len}; use more text "
                "or a smaller --seq-length"
            )
        elapsed = time.perf_counter() - start
        meta = base_meta(kind, "rows", seq_length, tokenizer, sources, command or [])
        meta.update(
            loss_on="all",
            doc_separator=doc_separator,
            text_unit=text_unit if kind == "text" else None,
            rows=writer.rows,
            tokens=writer.rows * row_len,
            loss_tokens=writer.rows * seq_length,
            padding_tokens=0,
            stream_tokens=stream.total,
            separator_tokens=stream.separators,
            dropped_tail_tokens=leftover,
            workers=workers,
            seconds=round(elapsed, 2),
            tokens_per_second=round(stream.total / max(elapsed, 1e-9)),
        )
        write_meta(folder, meta)
    return meta
