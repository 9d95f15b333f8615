"""A base model folder + a LoRA adapter folder -> a plain Hugging Face folder with the adapter folded in
(`qwen15 lora merge`): what transformers, vLLM without --enable-lora, and `qwen15 chat` load like any model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qwen15.atomic import check_output_folder
from qwen15.hf_checkpoint import model_folder
from qwen15.lora.modules import merge_adapters
from qwen15.lora.peft_format import AdapterError, load_adapter, read_adapter
from qwen15.model_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter_folder(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write `out`: the weights of `base` with W + scaling B @ A for every adapted projection, computed in fp32
    and cast once to `dtype` ("auto": the base's torch_dtype); config, generation config and tokenizer files
    of the base. The embedding and output layer are never adapted, so a tied model stays tied."""
    base_dir = model_folder(base)
    adapter_files = read_adapter(adapter)  # refuse a bad adapter before loading the base
    out = check_output_folder(out, overwrite=overwrite, inputs=[base_dir, adapter_files.folder])
    name = ModelConfig.from_json_file(base_dir / "config.json").torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise AdapterError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    from qwen15.model import Qwen

    model = Qwen.from_pretrained(base_dir, dtype=DTYPES[name])
    load_adapter(model, adapter_files.folder, dtype=torch.float32)  # fp32 adapters: the product is fp32
    merge_adapters(model)
    model.save_pretrained(out, max_shard_size=max_shard_size, overwrite=overwrite)
    return out
