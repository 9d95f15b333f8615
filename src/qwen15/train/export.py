"""Training checkpoint (DCP, saved by any number of processes) -> Hugging Face folder that transformers loads, or
(a LoRA run) -> PEFT adapter folder.

Weights are read one output shard at a time (DCP loads any subset of keys, resharding as it reads), so exporting
needs memory for one shard, not for the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from qwen15.errors import UserError
from qwen15.hf_checkpoint import hf_state_dict, tensor_blocks
from qwen15.hf_folder import (
    OutTensor,
    generation_config,
    hf_name,
    our_name,
    parse_size,
    plan_shards,
    saved_special_ids,
    write_hf_folder,
)
from qwen15.lora.modules import LoRASpec, adapter_parameters, add_adapters
from qwen15.lora.peft_format import write_adapter
from qwen15.model import Qwen
from qwen15.model_config import ENDOFTEXT_ID, IM_END_ID, ModelConfig
from qwen15.train.dcp_checkpoint import DamagedCheckpoint, read_trainer_state, resolve_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(UserError):
    pass


def special_ids(folder: Path) -> tuple[int, int]:
    """(<|endoftext|>, <|im_end|>) ids of the tokenizer saved in `folder` (Qwen's own when there is none)."""
    found = saved_special_ids(folder)
    return found.get("<|endoftext|>", ENDOFTEXT_ID), found.get("<|im_end|>", IM_END_ID)


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    chat: bool | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    warn=None,
) -> Path:
    """Write `out_dir` (weights, config.json, generation_config.json, tokenizer files) from a training checkpoint.

    dtype "auto" keeps the checkpoint's config torch_dtype (bfloat16 for the real sizes). chat None: as the
    training run decided (chat data -> chat model: eos <|im_end|>, both stop ids in generation_config.json).
    The checkpoint is checked first (a damaged one is named; from a run directory, its latest intact one is
    used, and `warn` says so), and `out_dir` must not hold it.
    """
    parse_size(max_shard_size)  # before any work
    ckpt = resolve_checkpoint(checkpoint, warn)
    config = ModelConfig.from_json_file(ckpt / "config.json")
    state = read_trainer_state(ckpt)
    if state.get("lora"):
        raise ExportError(
            f"{ckpt}: a LoRA checkpoint holds the adapters only. `qwen15 convert --to peft {checkpoint} OUT` "
            "writes them in PEFT's format; `qwen15 lora merge --model BASE --adapter OUT --output MERGED` then "
            "folds them into the base model"
        )
    chat = bool(state.get("chat", False)) if chat is None else chat
    dtype_name = config.torch_dtype if dtype == "auto" else dtype
    if dtype_name not in DTYPES:
        raise ExportError(f"dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    endoftext, im_end = special_ids(ckpt)
    config = config.replace(torch_dtype=dtype_name, eos_token_id=im_end if chat else config.eos_token_id)
    with torch.device("meta"):
        model = Qwen(config)
    out_dtype = DTYPES[dtype_name]
    loaded: dict[str, torch.Tensor] = {}

    def blocks(name: str) -> Iterator[np.ndarray]:
        """A tensor's blocks; the first tensor of each output file loads that whole file's tensors with one DCP
        read (DCP reshards from any layout), so memory stays at one output file."""
        if name not in loaded:
            part = {our_name(t.name): torch.empty(t.shape, dtype=out_dtype) for t in shards[shard_of[name]]}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                try:
                    dcp.load({"model": part}, checkpoint_id=str(ckpt / "state"), no_dist=True)
                except Exception as e:  # damage the size check cannot see (same size, other bytes)
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise DamagedCheckpoint(f"{ckpt}: the weights cannot be read ({first[:300]})") from e
            loaded.clear()
            loaded.update({hf_name(k): v for k, v in part.items()})
        yield from tensor_blocks(loaded.pop(name))

    shapes = {k: tuple(v.shape) for k, v in hf_state_dict(model).items()}
    tensors = [OutTensor(n, shape, dtype_name, lambda n=n: blocks(n)) for n, shape in shapes.items()]
    shards = plan_shards(tensors, max_shard_size)
    shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
    return write_hf_folder(
        out_dir,
        config,
        tensors,
        generation=generation_config(chat, endoftext, im_end, state.get("generation")),
        tokenizer_dir=ckpt,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        inputs=[ckpt],
    )


def export_peft(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False, warn=None) -> Path:
    """Write the adapters of a LoRA training checkpoint as a PEFT folder (adapter_config.json +
    adapter_model.safetensors, fp32), naming the run's model.path as the base model."""
    ckpt = resolve_checkpoint(checkpoint, warn)
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
        try:
            dcp.load({"model": tensors}, checkpoint_id=str(ckpt / "state"), no_dist=True)
        except Exception as e:  # damage the size check cannot see (same size, other bytes)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DamagedCheckpoint(f"{ckpt}: the adapters cannot be read ({first[:300]})") from e
    return write_adapter(
        out_dir, spec, tensors, base_model_name_or_path=lora.get("base"), overwrite=overwrite, inputs=[ckpt]
    )
