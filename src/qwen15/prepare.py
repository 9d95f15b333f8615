"""Preparing a loaded model for fast generation: what `qwen15 generate` / `chat` do, as one library function."""

from __future__ import annotations

from torch import nn

from qwen15.errors import UserError
from qwen15.fuse import fuse_projections
from qwen15.quantize import can_pack_for_cpu, pack_for_cpu, quantize_int8

QUANTIZATIONS = ("none", "int8")


def prepare_for_inference(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """In place, for generation only: fused q/k/v and gate/up projections, then int8 weights (`quantize="int8"`)
    or, on CPU, matrices prepacked for oneDNN. Returns the model; `model.inference_format` says what was done.
    The outputs stay those of the model (exactly for packing, to rounding for fusion; int8 approximates)."""
    quantize = quantize or "none"
    if quantize not in QUANTIZATIONS:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    fuse_projections(model)
    if quantize == "int8":
        quantize_int8(model)
        model.inference_format = "fused, int8 weights"
    elif can_pack_for_cpu(model):
        pack_for_cpu(model)
        model.inference_format = "fused, oneDNN-packed"
    else:
        model.inference_format = "fused"
    return model.eval()
