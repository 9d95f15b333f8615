"""MindSpore .ckpt files read and written without MindSpore.

A .ckpt is a run of serialized `Checkpoint` messages, each holding one `value {tag, tensor {dims, tensor_type,
tensor_content}}`; a tensor larger than the slice size (512 MiB) is cut into consecutive values with the same tag
and dims. `save_checkpoint(crc_check=True)` appends b"crc_num" and the CRC-32 of everything before it as 10
big-endian bytes; `enc_key` files are encrypted whole and start with a magic number instead of a message.
The reader indexes the file (payloads are skipped, not read) and reads tensors by rows from their byte ranges.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen15.errors import UserError
from qwen15.mindspore import protobuf as pb
from qwen15.mindspore.dtypes import DTYPES, FROM_MINDSPORE, itemsize, storage
from qwen15.mindspore.source import RowSource, empty_rows

SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE (in KiB there)
CRC_MARK = b"crc_num"
CRC_TRAILER = len(CRC_MARK) + 10
CIPHER_MAGIC = (0x7F3A5ED8).to_bytes(4, "little")  # what enc_key files start with
_CHUNK = 16 * 2**20


class CkptError(UserError):
    """A .ckpt file that cannot be read; the message names the file, the tensor and what was found."""


@dataclass
class CkptTensor(RowSource):
    name: str
    dtype: str
    shape: tuple[int, ...]
    where: str
    reader: CkptFile = field(repr=False)
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (file offset, length) of each slice's bytes

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        out = empty_rows(self.dtype, self.shape, r0, r1)
        row_bytes = math.prod(self.row_shape) * itemsize(self.dtype)
        self.reader.read_range(self.pieces, r0 * row_bytes, memoryview(out.reshape(-1).view(np.uint8)))
        return out


class CkptFile:
    """The tensors of one .ckpt file (an index built on open; the CRC checked when the file carries one)."""

    def __init__(self, path: str | os.PathLike, *, check_crc: bool = True):
        self.path = Path(path)
        self.tensors: dict[str, CkptTensor] = {}
        self.strings: dict[str, str] = {}  # append_dict strings (tensor_type "str")
        self.has_crc = False
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for reads; closed by close())
        except FileNotFoundError:
            raise CkptError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CkptError(f"{self.path}: is a folder, not a .ckpt file") from None
        try:
            self._index(check_crc)
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CkptFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- reading

    def _index(self, check_crc: bool) -> None:
        f, size = self._file, os.fstat(self._file.fileno()).st_size
        head = f.read(4)
        if head[:4] == CIPHER_MAGIC:
            raise CkptError(
                f"{self.path}: an encrypted MindSpore checkpoint (saved with enc_key). Decrypt it where MindSpore "
                "runs (mindspore.load_checkpoint(path, dec_key=...) then mindspore.save_checkpoint without "
                "enc_key) and convert that file"
            )
        if not head or head[0] != 0x0A:
            raise CkptError(
                f"{self.path}: not a MindSpore checkpoint (it starts with bytes {head.hex(' ') or 'nothing'}, "
                "a .ckpt starts with 0a)"
            )
        end = size
        if size >= CRC_TRAILER:
            f.seek(size - CRC_TRAILER)
            trailer = f.read(CRC_TRAILER)
            if trailer[: len(CRC_MARK)] == CRC_MARK:
                self.has_crc, end = True, size - CRC_TRAILER
                stored = int.from_bytes(trailer[len(CRC_MARK) :], "big")
        pos, last = 0, None
        while pos < end:
            f.seek(pos)
            header = f.read(min(end - pos, 4096))
            try:
                if header[0] != 0x0A:
                    raise pb.WireError(f"byte {header[0]:#04x} where a checkpoint value starts")
                length, p = pb.decode_varint(header, 1)
                value_start, value_end = pos + p, pos + p + length
                if value_end > end:
                    raise CkptError(
                        f"{self.path}: tensor {self._peek_tag(header[p:])!r} is cut off (its slice ends at byte "
                        f"{value_end}, the file has {end}): the file is truncated; copy it again"
                    )
                name, dtype, dims, content = self._parse_value(value_start, value_end)
            except pb.WireError as e:
                after = f" (after tensor {last.name!r})" if last else ""
                raise CkptError(
                    f"{self.path}: damaged or not a checkpoint at byte {pos}{after}: {e}. If the file was "
                    "copied, copy it again"
                ) from None
            last = self._add(name, dtype, dims, content, last)
            pos = value_end
        if self.has_crc and check_crc:
            computed = self._crc(end)
            if computed != stored:
                raise CkptError(
                    f"{self.path}: CRC check failed (stored {stored:#010x}, computed {computed:#010x}): the file "
                    "is damaged; copy it again"
                )
        for t in self.tensors.values():
            got = sum(n for _, n in t.pieces)
            if got != t.nbytes:
                raise CkptError(
                    f"{self.path}: tensor {t.name!r} has {got} bytes for shape {list(t.shape)} of {t.dtype} "
                    f"({t.nbytes} bytes): the file is truncated or damaged"
                )

    @staticmethod
    def _peek_tag(value: bytes) -> str:
        try:
            tag, pos = pb.decode_varint(value, 0)
            n, pos = pb.decode_varint(value, pos)
            return bytes(value[pos : pos + n]).decode("utf-8", "replace") if tag == 0x0A else "?"
        except pb.WireError:
            return "?"

    def _parse_value(self, start: int, end: int):
        """(tag, tensor_type, dims, (offset, length) of tensor_content) of the Value message at [start, end)."""
        f = self._file
        f.seek(start)
        head = f.read(min(end - start, 4096))
        name, tensor = None, None
        pos = 0
        while pos < len(head):
            tag, pos = pb.decode_varint(head, pos)
            fnum, wire = tag >> 3, tag & 7
            if wire != pb.LENGTH:
                raise pb.WireError(f"field {fnum} of a checkpoint value has wire type {wire}")
            n, pos = pb.decode_varint(head, pos)
            if fnum == 1:
                if pos + n > len(head):
                    raise pb.WireError("tag runs past the end")
                name = bytes(head[pos : pos + n]).decode("utf-8", "replace")
            elif fnum == 2:
                tensor = (start + pos, n)
            elif fnum == 3:
                raise CkptError(
                    f"{self.path}: parameter {name!r} is a MapParameter (a hash-table embedding); qwen15 reads "
                    "dense tensors only"
                )
            pos += n
            if start + pos >= end:
                break
        if name is None or tensor is None:
            raise pb.WireError("a checkpoint value without tag or tensor")
        t_start, t_len = tensor
        f.seek(t_start)
        thead = f.read(min(t_len, 4096))
        dims_raw, dtype, content = [], None, None
        pos = 0
        while pos < len(thead):
            tag, pos = pb.decode_varint(thead, pos)
            fnum, wire = tag >> 3, tag & 7
            if wire == pb.VARINT:
                v, pos = pb.decode_varint(thead, pos)
                if fnum == 1:
                    dims_raw.append(v)
                continue
            if wire != pb.LENGTH:
                raise pb.WireError(f"field {fnum} of a tensor has wire type {wire}")
            n, pos = pb.decode_varint(thead, pos)
            if fnum == 1:
                dims_raw.append(bytes(thead[pos : pos + n]))
            elif fnum == 2:
                dtype = bytes(thead[pos : pos + n]).decode("ascii", "replace")
            elif fnum == 3:
                content = (t_start + pos, n)
                break  # the payload comes last; it is not read here
            pos += n
        if dtype is None or content is None:
            raise pb.WireError(f"tensor {name!r} without tensor_type or tensor_content")
        return name, dtype, pb.repeated_ints(dims_raw), content

    def _add(self, name: str, dtype: str, dims: list[int], content: tuple[int, int], last):
        if dtype == "str":
            f = self._file
            f.seek(content[0])
            raw = f.read(content[1])
            self.strings[name] = raw.decode("utf-32-le", "replace").rstrip("\0")
            return None
        if dtype not in FROM_MINDSPORE:
            known = ", ".join(ms for _, ms, _ in DTYPES.values())
            raise CkptError(
                f"{self.path}: tensor {name!r} has tensor_type {dtype!r}, which qwen15 does not read (known: "
                f"{known})"
            )
        shape = () if dims == [0] and content[1] else tuple(dims)  # as load_checkpoint reads dims [0]
        if last is not None and last.name == name:
            if last.shape != shape or last.dtype != FROM_MINDSPORE[dtype]:
                raise CkptError(
                    f"{self.path}: the slices of tensor {name!r} disagree on shape or type "
                    f"({list(last.shape)} {last.dtype} then {list(shape)} {FROM_MINDSPORE[dtype]})"
                )
            last.pieces.append(content)
            return last
        if name in self.tensors:
            raise CkptError(f"{self.path}: tensor {name!r} appears twice")
        t = CkptTensor(name, FROM_MINDSPORE[dtype], shape, str(self.path), self, [content])
        self.tensors[name] = t
        return t

    def _crc(self, end: int) -> int:
        f, crc, pos = self._file, 0, 0
        f.seek(0)
        while pos < end:
            chunk = f.read(min(_CHUNK, end - pos))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        return crc

    def read_range(self, pieces: list[tuple[int, int]], start: int, out: memoryview) -> None:
        """Fill `out` with the tensor's bytes from byte `start` on (its payload is spread over `pieces`)."""
        f, done, base = self._file, 0, 0
        for offset, length in pieces:
            if done == len(out):
                return
            lo = start + done - base
            if lo < length:
                n = min(length - lo, len(out) - done)
                f.seek(offset + lo)
                if f.readinto(out[done : done + n]) != n:
                    raise CkptError(f"{self.path}: short read (the file changed or was truncated)")
                done += n
            base += length


# ------------------------------------------------------------------------------------------------ writing


def _record(name: bytes, dtype: str, shape: tuple[int, ...], content_len: int) -> bytes:
    """One serialized Checkpoint message up to (not including) its tensor_content bytes."""
    tensor_head = b"".join(pb.key(1, pb.VARINT) + pb.encode_varint(d) for d in shape)
    tensor_head += pb.length_delimited(2, DTYPES[dtype][1].encode())
    tensor_head += pb.key(3, pb.LENGTH) + pb.encode_varint(content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = pb.length_delimited(1, name) + pb.key(2, pb.LENGTH) + pb.encode_varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return pb.key(1, pb.LENGTH) + pb.encode_varint(value_len) + value_head + tensor_head


class CkptWriter:
    """Writes tensors to a .ckpt as MindSpore's save_checkpoint does (same slices, same optional CRC trailer).

    The file is written beside `path` and renamed onto it by `close()`; `abort()` removes it.
    """

    def __init__(self, path: str | os.PathLike, *, crc: bool = False, slice_bytes: int = SLICE_BYTES):
        self.path = Path(path)
        self.crc_enabled, self.slice_bytes, self.crc = crc, slice_bytes, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")

    def _write(self, data) -> None:
        self.file.write(data)
        if self.crc_enabled:
            self.crc = zlib.crc32(data, self.crc)

    def add(self, name: str, dtype: str, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> None:
        """Tensor `name` from `blocks` (its data in order, any block sizes, in `dtype`'s storage)."""
        total = math.prod(shape) * itemsize(dtype)
        tag = name.encode("utf-8")
        want, written = storage(dtype), 0
        left_in_slice = 0
        for block in blocks:
            data = memoryview(np.ascontiguousarray(block, want).reshape(-1).view(np.uint8))
            while len(data):
                if left_in_slice == 0:
                    left_in_slice = min(self.slice_bytes, total - written)
                    if left_in_slice <= 0:
                        raise ValueError(f"{name}: more data than its shape {list(shape)} holds")
                    self._write(_record(tag, dtype, shape, left_in_slice))
                n = min(left_in_slice, len(data))
                self._write(data[:n])
                data, left_in_slice, written = data[n:], left_in_slice - n, written + n
        if total == 0:
            self._write(_record(tag, dtype, shape, 0))
        if written != total:
            raise ValueError(f"{name}: {written} bytes written for shape {list(shape)} ({total} bytes)")

    def close(self) -> None:
        if self.crc_enabled:
            self.file.write(CRC_MARK + self.crc.to_bytes(10, "big"))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def __enter__(self) -> CkptWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
