"""Quantized checkpoints on disk: a Hugging Face-style folder that loads without quantizing again.

    qwen15 convert --quantize int4 HF_DIR OUT_DIR            # writes it (save_quantized)
    model = load_quantized("OUT_DIR")                         # what generate/chat do with such a folder

Format (version 2): config.json is the model's own plus

    "quantization_config": {"quant_method": "qwen15", "format_version": 2, "weights": "int8" | "int4",
                            "group_size": 64, "output_layer": "int8" | "int4"}

and model.safetensors holds, under the Hugging Face name P of each quantized matrix (`model.layers.0.mlp.up_proj`,
`model.embed_tokens`, an untied `lm_head`): int8 `P.qweight` I8 [N, K] + `P.scales` F32 [N]; int4 `P.qweight` U8
[N, K/2] in the kernel's layout (int4.pack; version 1 had another, so its int4 folders are refused) + `P.scales` and `P.mins` BF16 [N, K/group] (a tensor's group size is K over
its number of scales); `P.bias` and the norms as in any checkpoint, in config.json's torch_dtype (the activation
dtype). Projections are stored unfused (one tensor per Hugging Face matrix), like the checkpoint they came from.
transformers does not read this format; `Qwen.from_pretrained` refuses it with a message pointing here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen15.atomic import check_output_folder
from qwen15.hf_checkpoint import DTYPE_NAMES, model_folder, out_tensors
from qwen15.hf_folder import CheckpointError, read_generation_config, read_json, write_hf_folder
from qwen15.model import MLP, Attention, Qwen
from qwen15.model_config import ModelConfig
from qwen15.quantize.int4 import Int4Embedding, Int4Linear, quantize_int4
from qwen15.quantize.int8 import Int8Embedding, Int8Linear, quantize_int8

METHOD = "qwen15"
FORMAT_VERSION = 2  # 2: int4 in the interleaved layout of int4.pack (1: int8 as now, int4 in another layout)


def quantization_of(path: str | Path) -> dict[str, Any] | None:
    """config.json's quantization_config of a model folder, or None when it has none (or no config.json)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    quant = data.get("quantization_config") if isinstance(data, dict) else None
    return quant if isinstance(quant, dict) else None


def _tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(module, (Int8Linear, Int8Embedding)):
        out = {f"{prefix}.qweight": module.weight, f"{prefix}.scales": module.scales}
    elif isinstance(module, (Int4Linear, Int4Embedding)):
        out = {f"{prefix}.{n}": getattr(module, n) for n in ("qweight", "scales", "mins")}
    else:
        raise CheckpointError(f"cannot save {prefix}: {type(module).__name__} is not a quantized module")
    if getattr(module, "bias", None) is not None:
        out[f"{prefix}.bias"] = module.bias.detach()
    return out


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer_source: str | os.PathLike | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "path",
) -> Path:
    """Write a quantized (int8 or int4) model, not fused, as a folder `load_quantized` reads, by the output rule
    of qwen15.atomic (an existing folder replaced only with overwrite and only one qwen15 wrote; never one of
    `inputs` or the folder the model came from)."""
    method = getattr(model, "quantization", None)
    if method not in ("int8", "int4"):
        raise CheckpointError(
            f"cannot save to {path}: the model is not quantized (quantize_int8/quantize_int4)"
        )
    if any(type(b.self_attn) is not Attention or type(b.mlp) is not MLP for b in model.layers.values()):
        raise CheckpointError(
            f"cannot save to {path}: the projections were fused for inference; quantize an unfused model to save it"
        )
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for i, block in model.layers.items():
        for part in ("self_attn", "mlp"):
            for name, child in getattr(block, part).named_children():
                state.update(_tensors(f"model.layers.{i}.{part}.{name}", child))
        state[f"model.layers.{i}.input_layernorm.weight"] = block.input_layernorm.weight.detach()
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = (
            block.post_attention_layernorm.weight.detach()
        )
    state["model.norm.weight"] = model.norm.weight.detach()
    state.update(_tensors("model.embed_tokens", model.embed_tokens))
    if not config.tie_word_embeddings:
        state.update(_tensors("lm_head", model.lm_head))
    head = model.lm_head
    quant = {
        "quant_method": METHOD,
        "format_version": FORMAT_VERSION,
        "weights": method,
        "output_layer": "int4" if isinstance(head, Int4Linear) else "int8",
    }
    groups = {m.group_size for m in model.modules() if isinstance(m, Int4Linear)}
    if groups:
        quant["group_size"] = max(groups)
    dtype = model.norm.weight.dtype
    config = config.replace(
        torch_dtype=DTYPE_NAMES.get(dtype, config.torch_dtype),
        extra={**config.extra, "quantization_config": quant},
    )
    source = getattr(model, "source_dir", None)
    return write_hf_folder(
        path,
        config,
        out_tensors(state),
        generation=getattr(model, "generation_config", None),
        tokenizer_dir=tokenizer_source or source,
        overwrite=overwrite,
        inputs=[source, *inputs],
        flag=flag,
    )


def load_quantized(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """A Qwen model from a folder written by save_quantized, its matrices already int8/int4 (nothing is
    quantized again). dtype: activations, norms and biases (default: config.json's torch_dtype)."""
    from safetensors import safe_open

    folder = model_folder(path)
    data = read_json(folder / "config.json")
    quant = data.pop("quantization_config", None)
    where = str(folder / "config.json")
    if not isinstance(quant, dict) or quant.get("quant_method") != METHOD:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise CheckpointError(
            f"{where}: not a qwen15 quantized folder (quantization_config.quant_method is {method!r}); "
            "qwen15 reads its own int8/int4 folders and unquantized checkpoints"
        )
    version, weights = quant.get("format_version"), quant.get("weights")
    if not (version == FORMAT_VERSION or (version == 1 and weights == "int8")) or weights not in (
        "int8",
        "int4",
    ):
        raise CheckpointError(
            f"{where}: quantization_config {quant} is not one this qwen15 reads (format_version "
            f"{FORMAT_VERSION}, weights int8 or int4); convert the original checkpoint again"
        )
    config = ModelConfig.from_hf_dict(data, where=where)
    dtype = dtype or getattr(torch, config.torch_dtype, torch.bfloat16)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files")
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    index = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def get(name: str, kind: torch.dtype | None = None) -> torch.Tensor:
        if name not in index:
            raise CheckpointError(
                f"{folder}: tensor {name} is missing; the folder is incomplete or not this model's"
            )
        t = index[name].get_tensor(name)
        return (t if kind is None else t.to(kind)).to(device)

    def linear(prefix: str, has_bias: bool) -> nn.Module:
        bias = get(f"{prefix}.bias", dtype) if has_bias else None
        if f"{prefix}.mins" in index:
            return Int4Linear(
                get(f"{prefix}.qweight"), get(f"{prefix}.scales"), get(f"{prefix}.mins"), bias, dtype
            )
        return Int8Linear(get(f"{prefix}.qweight"), get(f"{prefix}.scales"), bias, dtype)

    def embedding(prefix: str) -> nn.Module:
        if f"{prefix}.mins" in index:
            return Int4Embedding(
                get(f"{prefix}.qweight"), get(f"{prefix}.scales"), get(f"{prefix}.mins"), dtype
            )
        return Int8Embedding(get(f"{prefix}.qweight"), get(f"{prefix}.scales"), dtype)

    with torch.device("meta"):
        model = Qwen(config)
    with torch.no_grad():
        for i, block in model.layers.items():
            for part in ("self_attn", "mlp"):
                parent = getattr(block, part)
                for name, child in list(parent.named_children()):
                    setattr(parent, name, linear(f"model.layers.{i}.{part}.{name}", child.bias is not None))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                getattr(block, norm).weight = nn.Parameter(
                    get(f"model.layers.{i}.{norm}.weight", dtype), False
                )
        model.norm.weight = nn.Parameter(get("model.norm.weight", dtype), requires_grad=False)
        model.embed_tokens = embedding("model.embed_tokens")
        model.lm_head = (
            model.embed_tokens.as_linear() if config.tie_word_embeddings else linear("lm_head", False)
        )
    model.quantization = quant["weights"]
    model.generation_config = read_generation_config(folder)
    model.source_dir = str(folder)
    return model.eval()


def quantize_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    method: str,
    *,
    group_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "OUT_DIR",
) -> Path:
    """Load a Hugging Face folder, quantize it (int8 or int4) and write the quantized folder `out` (checked by
    the output rule before anything loads; `inputs`: more paths it must not replace)."""
    src = model_folder(source)
    check_output_folder(out, overwrite=overwrite, inputs=[src, *inputs], flag=flag)
    if quantization_of(src) is not None:
        raise CheckpointError(f"{src} is quantized already; convert the unquantized checkpoint")
    model = Qwen.from_pretrained(str(src), dtype=torch.bfloat16)
    if method == "int8":
        quantize_int8(model, progress=progress)
    elif method == "int4":
        quantize_int4(model, **({} if group_size is None else {"group_size": group_size}), progress=progress)
    else:
        raise CheckpointError(f"unknown quantization {method!r}; choose int8 or int4")
    return save_quantized(
        model, out, tokenizer_source=src, overwrite=overwrite, inputs=[src, *inputs], flag=flag
    )
