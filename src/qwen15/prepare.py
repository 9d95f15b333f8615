"""Preparing a loaded model for fast generation: what `qwen15 generate` / `chat` do, as one library function."""

from __future__ import annotations

from torch import nn

from qwen15.cpu_decode import use_cpu_decode_ops
from qwen15.errors import UserError
from qwen15.fuse import fuse_projections
from qwen15.quantize import describe, pack_for_cpu, quantize_int4, quantize_int8

QUANTIZATIONS = ("none", "int8", "int4")


def prepare_for_inference(
    model: nn.Module, quantize: str | None = None, *, group_size: int | None = None
) -> nn.Module:
    """In place, for generation only: fused q/k/v and gate/up projections, then int8 or int4 weights
    (`quantize="int8"|"int4"`, int4 in groups of `group_size` columns, default 64) or, on CPU, matrices prepacked
    for oneDNN; on CPU the small operations of decode steps fused (qwen15.cpu_decode). A model loaded quantized
    (qwen15.quantize.load_quantized) keeps its weights. Returns the model;
    `model.inference_format` says what was done (format and kernel, one line). The outputs stay those of the model
    (exactly for packing, to rounding for fusion; int8/int4 approximate)."""
    quantize = quantize or "none"
    if quantize not in QUANTIZATIONS:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if group_size is not None and quantize != "int4":
        raise UserError(f"group_size applies to int4 only (quantize is {quantize!r})")
    stored = getattr(model, "quantization", None)
    if stored is not None and quantize not in ("none", stored):
        raise UserError(
            f"quantize={quantize!r}: the model holds {stored} weights already (a folder of `qwen15 convert "
            "--quantize`); leave quantize out, or load the unquantized checkpoint"
        )
    fuse_projections(model)
    if stored is None and quantize == "int8":
        quantize_int8(model)
    elif stored is None and quantize == "int4":
        quantize_int4(model, **({} if group_size is None else {"group_size": group_size}))
    elif stored is None:
        pack_for_cpu(model)  # CPU bf16/fp32 only; other models are left as they are
    ops = ", C decode operations" if use_cpu_decode_ops(model) else ""
    model.inference_format = f"fused, {describe(model)}{ops}"
    return model.eval()
