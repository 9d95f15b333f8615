"""Training checkpoint (DCP, saved by any number of processes) -> Hugging Face folder that transformers loads, or
(a LoRA run) -> PEFT adapter folder.

Weights are read one output shard at a time (DCP loads any subset of keys, resharding as it reads), so exporting
needs memory for one shard, not for the model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from qwen15.errors import UserError
from qwen15.hf_checkpoint import generation_config, hf_name, our_name, write_hf_folder
from qwen15.lora.modules import LoRASpec, adapter_parameters, add_adapters
from qwen15.lora.peft_format import write_adapter
from qwen15.model import Qwen
from qwen15.model_config import ENDOFTEXT_ID, IM_END_ID, ModelConfig
from qwen15.train.dcp_checkpoint import read_trainer_state, resolve_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(UserError):
    pass


def special_ids(folder: Path) -> tuple[int, int]:
    """(<|endoftext|>, <|im_end|>) ids of the tokenizer saved in `folder` (Qwen's own when there is none)."""
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        decoder = json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        by_text = {spec.get("content"): int(i) for i, spec in decoder.items()}
        return by_text.get("<|endoftext|>", ENDOFTEXT_ID), by_text.get("<|im_end|>", IM_END_ID)
    return ENDOFTEXT_ID, IM_END_ID


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    chat: bool | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write `out_dir` (weights, config.json, generation_config.json, tokenizer files) from a training checkpoint.

    dtype "auto" keeps the checkpoint's config torch_dtype (bfloat16 for the real sizes). chat None: as the
    training run decided (chat data -> chat model: eos <|im_end|>, both stop ids in generation_config.json).
    """
    ckpt = resolve_checkpoint(checkpoint)
    config = ModelConfig.from_json_file(ckpt / "config.json")
    state = read_trainer_state(ckpt)
    if state.get("lora"):
        raise ExportError(
            f"{ckpt}: a LoRA checkpoint holds the adapters only. `qwen15 convert --to peft {checkpoint} OUT` "
            "writes them in PEFT's format; `qwen15 lora merge --model BASE --adapter OUT --output MERGED` then "
            "folds them into the base model"
        )
    chat = bool(state.get("chat", False)) if chat is None else chat
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ExportError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    endoftext, im_end = special_ids(ckpt)
    config = config.replace(torch_dtype=name, eos_token_id=im_end if chat else config.eos_token_id)
    with torch.device("meta"):
        model = Qwen(config)
    tied = config.tie_word_embeddings
    shapes = {
        hf_name(k): tuple(v.shape)
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        part = {our_name(n): torch.empty(shapes[n], dtype=DTYPES[name]) for n in names}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": part}, checkpoint_id=str(ckpt / "state"), no_dist=True)
        return {hf_name(k): v for k, v in part.items()}

    try:
        return write_hf_folder(
            out_dir,
            config,
            shapes,
            DTYPES[name],
            read,
            generation=generation_config(chat, endoftext, im_end, state.get("generation")),
            tokenizer_dir=ckpt,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
        )
    except FileExistsError as e:
        raise ExportError(str(e)) from None


def export_peft(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the adapters of a LoRA training checkpoint as a PEFT folder (adapter_config.json +
    adapter_model.safetensors, fp32), naming the run's model.path as the base model."""
    ckpt = resolve_checkpoint(checkpoint)
    state = read_trainer_state(ckpt)
    lora = state.get("lora")
    if not lora:
        raise ExportError(
            f"{ckpt}: this checkpoint is from full training and holds no adapters; export it with --to hf"
        )
    config = ModelConfig.from_json_file(ckpt / "config.json")
    spec = LoRASpec(lora["r"], lora["alpha"], lora["dropout"], lora["rslora"], tuple(lora["target_modules"]))
    with torch.device("meta"):
        model = Qwen(config)
        add_adapters(model, spec, init=False)
    tensors = {k: torch.empty(p.shape, dtype=torch.float32) for k, p in adapter_parameters(model).items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": tensors}, checkpoint_id=str(ckpt / "state"), no_dist=True)
    return write_adapter(
        out_dir, spec, tensors, base_model_name_or_path=lora.get("base"), overwrite=overwrite
    )
