"""The few pieces of the protobuf wire format that MindSpore's files need, decoded and encoded by hand.

A hand decoder rather than the `protobuf` package: the messages are four small schemas, the checkpoint reader must
skip tensor payloads without reading them (the package parses a whole message into memory), and it keeps the
toolkit free of a runtime dependency that would be used for nothing else.
"""

from __future__ import annotations

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("varint runs past the end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def signed(value: int) -> int:
    """A varint read as int32/int64 (two's complement on 64 bits)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def key(field: int, wire: int) -> bytes:
    return encode_varint(field << 3 | wire)


def length_delimited(field: int, payload: bytes) -> bytes:
    return key(field, LENGTH) + encode_varint(len(payload)) + payload


def parse_message(data: bytes | memoryview) -> dict[int, list]:
    """Field number -> values in order: ints for varint/fixed fields, bytes for length-delimited ones."""
    fields: dict[int, list] = {}
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = decode_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = decode_varint(data, pos)
        elif wire == LENGTH:
            n, pos = decode_varint(data, pos)
            if pos + n > end:
                raise WireError(f"field {field} runs past the end")
            value, pos = bytes(data[pos : pos + n]), pos + n
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if pos + size > end:
                raise WireError(f"field {field} runs past the end")
            value, pos = int.from_bytes(data[pos : pos + size], "little"), pos + size
        else:
            raise WireError(f"unsupported wire type {wire} (field {field})")
        fields.setdefault(field, []).append(value)
    return fields


def repeated_ints(values: list) -> list[int]:
    """A repeated integer field, whether written one varint per value or packed into one length-delimited run."""
    out: list[int] = []
    for v in values:
        if isinstance(v, bytes):
            pos = 0
            while pos < len(v):
                x, pos = decode_varint(v, pos)
                out.append(signed(x))
        else:
            out.append(signed(v))
    return out
