"""Training checkpoint (DCP, saved by any number of processes) -> Hugging Face folder that transformers loads.

Weights are read one output shard at a time (DCP loads any subset of keys, resharding as it reads), so exporting
needs memory for one shard, not for the model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from qwen15.atomic import atomic_directory, atomic_write_text
from qwen15.errors import UserError
from qwen15.hf_checkpoint import SAFE_INDEX, SAFE_SINGLE, TOKENIZER_FILES, hf_name, parse_size
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


def generation_config(
    chat: bool, endoftext: int, im_end: int, settings: dict[str, Any] | None
) -> dict[str, Any]:
    """What Qwen1.5 ships: chat models stop on <|im_end|> and <|endoftext|> and sample; base models stop on
    <|endoftext|>."""
    if not chat:
        return {"bos_token_id": endoftext, "eos_token_id": endoftext, "do_sample": False}
    out: dict[str, Any] = {
        "bos_token_id": endoftext,
        "pad_token_id": endoftext,
        "eos_token_id": [im_end, endoftext],
    }
    out.update(
        settings
        or {"do_sample": True, "repetition_penalty": 1.1, "top_p": 0.8, "top_k": 20, "temperature": 0.7}
    )
    return out


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
    chat = bool(state.get("chat", False)) if chat is None else chat
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ExportError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    out_dtype = DTYPES[name]
    endoftext, im_end = special_ids(ckpt)
    config = config.replace(torch_dtype=name, eos_token_id=im_end if chat else config.eos_token_id)

    from safetensors.torch import save_file

    from qwen15.model import Qwen

    with torch.device("meta"):
        model = Qwen(config)
    shapes = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            weight_map = {}
            for i, keys in enumerate(shards):
                part = {k: torch.empty(shapes[k], dtype=out_dtype) for k in keys}
                with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load({"model": part}, checkpoint_id=str(ckpt / "state"), no_dist=True)
                fname = (
                    SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                save_file(
                    {hf_name(k): v for k, v in part.items()}, str(tmp / fname), metadata={"format": "pt"}
                )
                weight_map.update(dict.fromkeys((hf_name(k) for k in keys), fname))
                del part
            if len(shards) > 1:
                total = sum(torch.Size(s).numel() * out_dtype.itemsize for s in shapes.values())
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                atomic_write_text(tmp / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
            config.save_json(tmp / "config.json")
            gen = generation_config(chat, endoftext, im_end, state.get("generation"))
            atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
            for fname in TOKENIZER_FILES:
                if (ckpt / fname).is_file():
                    shutil.copyfile(ckpt / fname, tmp / fname)
    except FileExistsError as e:
        raise ExportError(str(e)) from None
    return Path(out_dir)
