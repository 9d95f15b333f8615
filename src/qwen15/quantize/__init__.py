"""Inference weight formats: weight-only int8 and int4 with AVX-512 CPU kernels, oneDNN-prepacked bf16/fp32,
and quantized checkpoints on disk.

    int8.py     int8 per output row (Int8Linear, Int8Embedding, quantize_int8)
    int4.py     int4 per group of 32/64 columns with a bf16 scale and min (Int4Linear, Int4Embedding, quantize_int4)
    kernels.py  the AVX-512 kernels of cpu_kernels.c, built once with the system C compiler; torch fallbacks
    cpu.py      bf16/fp32 matrices for generation: AVX-512 decode kernel or oneDNN prepacking (PackedLinear, pack_for_cpu)
    saved.py    quantized folders: save_quantized, load_quantized, quantization_of

Every transform swaps modules of a Qwen model in place (the model file knows nothing of them) and makes it
inference-only. Norms and the q/k/v biases stay in the model's dtype.
"""

from __future__ import annotations

from torch import nn

from qwen15.quantize.cpu import PackedLinear, can_pack_for_cpu, pack_for_cpu
from qwen15.quantize.int4 import Int4Embedding, Int4Linear, quantize_int4
from qwen15.quantize.int8 import Int8Embedding, Int8Linear, quantize_int8, quantize_rows
from qwen15.quantize.saved import load_quantized, quantization_of, save_quantized

__all__ = [
    "Int4Embedding",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "PackedLinear",
    "can_pack_for_cpu",
    "describe",
    "load_quantized",
    "pack_for_cpu",
    "quantize",
    "quantize_int4",
    "quantize_int8",
    "quantization_of",
    "quantize_rows",
    "save_quantized",
    "weight_nbytes",
]

METHODS = ("int8", "int4")


def quantize(model: nn.Module, method: str, **options) -> nn.Module:
    """quantize_int8 or quantize_int4 by name ("int8", "int4"); options go to the latter (group_size,
    output_bits)."""
    if method == "int8":
        return quantize_int8(model, **{k: v for k, v in options.items() if k == "progress"})
    if method == "int4":
        return quantize_int4(model, **options)
    raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")


def describe(model: nn.Module) -> str:
    """One line on the weight format and the kernel that runs it, for the startup note."""
    from qwen15.quantize import kernels

    mods = list(model.modules())
    q4 = [m for m in mods if isinstance(m, Int4Linear)]
    q8 = [m for m in mods if isinstance(m, Int8Linear)]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    act = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    if q4 or q8:
        blocks = "int4" if q4 else "int8"
        group = f" (group {q4[0].group_size})" if q4 else ""
        head = model.lm_head
        out = "int4" if isinstance(head, Int4Linear) else "int8" if isinstance(head, Int8Linear) else act
        fast = sum(m.kernel for m in q4 + q8)
        fallback = "torch dequantize + matmul" if q4 else "torch _weight_int8pack_mm"
        if fast == len(q4 + q8):
            kernel = "AVX-512 VNNI kernel"
        elif fast:
            kernel = f"AVX-512 VNNI kernel for {fast} of {len(q4 + q8)} matrices ({fallback} where the width is not a multiple of {'the group' if q4 else 64})"
        else:
            why = kernels.unavailable_reason()
            kernel = fallback + (f"; AVX-512 kernel unavailable: {why}" if why else "")
        return f"{blocks} weights{group}, output layer {out}, {act} activations, {kernel}"
    packed = [m for m in mods if isinstance(m, PackedLinear)]
    if packed and all(m.kernel for m in packed):
        amx = sum(m.amx for m in packed)
        kernel = "AMX" if amx == len(packed) else "AVX-512"
        if 0 < amx < len(packed):
            kernel = f"AMX ({amx} of {len(packed)} matrices) and AVX-512"
        return f"{act} weights, {kernel} kernel for decode, oneDNN for prompts"
    return f"{act} weights" + (", oneDNN-packed" if packed else "")


def weight_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_mkldnn else (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
