"""Element types by name, as MindSpore and safetensors spell them, and exact conversions between them in numpy.

bfloat16 is held as its raw uint16 bits (numpy has no bfloat16); float32 -> bfloat16 rounds to nearest even, as
torch does, so a conversion here gives the bits torch would.
"""

from __future__ import annotations

import numpy as np

# our name -> (numpy storage dtype, MindSpore tensor_type, safetensors dtype)
DTYPES: dict[str, tuple[type, str, str]] = {
    "float64": (np.float64, "Float64", "F64"),
    "float32": (np.float32, "Float32", "F32"),
    "float16": (np.float16, "Float16", "F16"),
    "bfloat16": (np.uint16, "BFloat16", "BF16"),
    "int64": (np.int64, "Int64", "I64"),
    "int32": (np.int32, "Int32", "I32"),
    "int16": (np.int16, "Int16", "I16"),
    "int8": (np.int8, "Int8", "I8"),
    "uint64": (np.uint64, "UInt64", "U64"),
    "uint32": (np.uint32, "UInt32", "U32"),
    "uint16": (np.uint16, "UInt16", "U16"),
    "uint8": (np.uint8, "UInt8", "U8"),
    "bool": (np.bool_, "Bool", "BOOL"),
}
FROM_MINDSPORE = {ms: name for name, (_, ms, _) in DTYPES.items()}
FROM_SAFETENSORS = {st: name for name, (_, _, st) in DTYPES.items()}
FLOATS = ("float32", "float16", "bfloat16")


def storage(dtype: str) -> np.dtype:
    return np.dtype(DTYPES[dtype][0])


def itemsize(dtype: str) -> int:
    return storage(dtype).itemsize


def convert(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """`array` (storage of `src`) as `dst`; the same array when the types agree."""
    if src == dst:
        return array
    if src not in FLOATS or dst not in FLOATS:
        raise ValueError(f"no conversion from {src} to {dst}")
    wide = bf16_to_f32(array) if src == "bfloat16" else array.astype(np.float32)
    if dst == "bfloat16":
        return f32_to_bf16(wide)
    return wide.astype(storage(dst))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0  # torch's NaN
    return rounded
