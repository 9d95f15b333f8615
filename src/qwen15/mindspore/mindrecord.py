"""MindRecord files (MindSpore's dataset format) read in plain Python.

A shard file starts with an 8-byte little-endian length and a JSON header (schema, blob fields, header and page
sizes, the names of all shards); data lives in pages at `header_size + page_id * page_size`. Its `.db` sibling is
an SQLite index with each row's page and byte range. A row's blob is an 8-byte little-endian length, then per
blob field (in the header's order) an 8-byte big-endian length and the field's bytes (no such length when there
is one blob field). Integer arrays are stored
compressed: a 4-byte big-endian count, 2 bits per element (MSB first) giving its width (1, 2, 4 or 8 bytes),
then the values, little-endian and signed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qwen15.errors import UserError

INT_TYPES = {"int32": np.int32, "int64": np.int64}


class MindRecordError(UserError):
    """A MindRecord file that cannot be read; the message names the file and row."""


def decode_ints(raw: bytes | memoryview, where: str) -> np.ndarray:
    """One compressed integer array (see the module docstring) as int64."""
    buf = np.frombuffer(raw, np.uint8)
    if len(buf) < 4:
        raise MindRecordError(f"{where}: integer field shorter than its count")
    count = int.from_bytes(bytes(buf[:4]), "big")
    ntype = (count + 3) // 4
    codes = ((buf[4 : 4 + ntype, None] >> np.array([6, 4, 2, 0], np.uint8)) & 3).reshape(-1)[:count]
    widths = np.left_shift(1, codes.astype(np.int64))
    values = buf[4 + ntype :]
    if len(codes) != count or int(widths.sum()) != len(values):
        raise MindRecordError(f"{where}: integer field of {count} values has {len(values)} value bytes")
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    out = np.zeros(count, np.int64)
    for w in (1, 2, 4, 8):
        sel = np.flatnonzero(widths == w)
        if not len(sel):
            continue
        acc = np.zeros(len(sel), np.uint64)
        for k in range(w):
            acc |= values[starts[sel] + k].astype(np.uint64) << np.uint64(8 * k)
        if w == 8:
            out[sel] = acc.view(np.int64)
        else:
            v = acc.astype(np.int64)
            out[sel] = np.where(v >= 1 << (8 * w - 1), v - (1 << (8 * w)), v)
    return out


class MindRecordShard:
    """One shard file and its .db index."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 1 << 30:
                    raise ValueError
                self.header = json.loads(f.read(n))
            self.schema = self.header["schema"][0]
            self.fields = {k: v["type"] for k, v in self.schema["schema"].items()}
            self.blob_fields = list(self.schema["blob_fields"])
            self.header_size, self.page_size = int(self.header["header_size"]), int(self.header["page_size"])
        except FileNotFoundError:
            raise MindRecordError(f"{path}: no such file") from None
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            raise MindRecordError(
                f"{path}: not a MindRecord file (no MindRecord header); pass a file written by "
                "mindspore.mindrecord.FileWriter, e.g. the seed's qwen1_5_preprocess.py output"
            ) from None
        db = path.with_name(path.name + ".db")
        if not db.is_file():
            raise MindRecordError(
                f"{path}: its index {db.name} is missing (MindRecord keeps one .db per shard file)"
            )
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                self.index = con.execute(
                    "SELECT ROW_ID, PAGE_ID_BLOB, PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END FROM INDEXES ORDER BY ROW_ID"
                ).fetchall()
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            raise MindRecordError(f"{db}: not a MindRecord index ({e})") from None

    def rows(self) -> Iterator[dict[str, np.ndarray]]:
        with open(self.path, "rb") as f:
            for row_id, page, begin, end in self.index:
                f.seek(self.header_size + page * self.page_size + begin)
                blob = f.read(end - begin)
                where = f"{self.path}: row {row_id}"
                if len(blob) != end - begin:
                    raise MindRecordError(f"{where} is cut off: the file is truncated")
                yield self._decode(blob, where)

    def _decode(self, blob: bytes, where: str) -> dict[str, np.ndarray]:
        if len(self.blob_fields) == 1:  # a single blob field is stored without its own length
            name = self.blob_fields[0]
            return {
                name: decode_ints(blob[8:], f"{where}, field {name!r}").astype(INT_TYPES[self.fields[name]])
            }
        pos, out = 8, {}
        for name in self.blob_fields:
            if pos + 8 > len(blob):
                raise MindRecordError(f"{where}: field {name!r} is missing from the row's bytes")
            n = int.from_bytes(blob[pos : pos + 8], "big")
            raw = memoryview(blob)[pos + 8 : pos + 8 + n]
            pos += 8 + n
            if len(raw) != n:
                raise MindRecordError(f"{where}: field {name!r} runs past the row's bytes")
            out[name] = decode_ints(raw, f"{where}, field {name!r}").astype(INT_TYPES[self.fields[name]])
        return out


class MindRecord:
    """All shards of a MindRecord data set (the file given and the siblings its header names), rows in order."""

    def __init__(self, path: str | Path):
        path = Path(path)
        first = MindRecordShard(path)
        names = first.header.get("shard_addresses") or [path.name]
        self.shards = [
            first if Path(n).name == path.name else MindRecordShard(path.with_name(Path(n).name))
            for n in names
        ]
        self.path = path
        self.fields = first.fields
        bad = {k: t for k, t in self.fields.items() if t not in INT_TYPES or k not in first.blob_fields}
        if bad:
            raise MindRecordError(
                f"{path}: fields {', '.join(f'{k} ({t})' for k, t in bad.items())} are not integer arrays; qwen15 "
                "reads token-id data sets (the seed's schemas: input_ids, target_ids, attention_mask)"
            )
        for s in self.shards[1:]:
            if s.fields != self.fields:
                raise MindRecordError(
                    f"{s.path}: another schema than {path.name} ({s.fields} vs {self.fields})"
                )

    def __len__(self) -> int:
        return sum(len(s.index) for s in self.shards)

    def files(self) -> list[Path]:
        return [p for s in self.shards for p in (s.path, s.path.with_name(s.path.name + ".db"))]

    def rows(self) -> Iterator[dict[str, np.ndarray]]:
        for s in self.shards:
            yield from s.rows()
