"""Adapters in Hugging Face PEFT's format, out and in: adapter_config.json + adapter_model.safetensors.

PEFT saves a LoRA adapter of Qwen2ForCausalLM under keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A
.weight` (A [r, in], B [out, r], no adapter name), in the adapter's dtype, with metadata {"format": "pt"}, and a
config whose keys below mean the same to PEFT, vLLM and qwen15. What plain LoRA on the projections cannot honour
is refused with the reason (DoRA, modules_to_save, trained biases, per-module ranks, embedding adapters ...), and
an adapter whose shapes are not this model's is refused naming the tensors.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen15.atomic import atomic_directory, atomic_write_text
from qwen15.hf_checkpoint import copy_full_
from qwen15.hf_folder import (
    CheckpointError,
    TensorEntry,
    check_names,
    hf_name,
    our_name,
    read_json,
    read_safetensors_header,
)
from qwen15.lora.modules import TARGETS, LoRAError, LoRASpec, add_adapters
from qwen15.paths import local_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> the transformers model
_KEY = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# Config keys whose non-default value asks for something plain LoRA on the projections does not do, and why.
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) adds a magnitude vector per module",
    "modules_to_save": "modules_to_save holds whole trained copies of modules (often the embedding or lm_head)",
    "lora_bias": "lora_bias trains a bias on B",
    "fan_in_fan_out": "fan_in_fan_out is for GPT-2's Conv1D layers, which Qwen1.5 does not have",
    "rank_pattern": "rank_pattern gives modules their own ranks",
    "alpha_pattern": "alpha_pattern gives modules their own alphas",
    "layer_replication": "layer_replication duplicates layers of the base model",
    "trainable_token_indices": "trainable_token_indices trains rows of the embedding",
    "target_parameters": "target_parameters adapts parameters rather than modules",
    "use_qalora": "QALoRA pools the input of each adapter",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches the adapter on at invocation tokens",
    "use_bdlora": "block-diagonal LoRA shares blocks across modules",
}


class AdapterError(LoRAError):
    """An adapter folder that cannot be read or does not fit the model; the message names the file and key."""


def peft_key(name: str) -> str:
    """Our adapter parameter name -> the key in adapter_model.safetensors."""
    return PREFIX + hf_name(name)


def peft_config(spec: LoRASpec, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json of `spec`, with the values PEFT writes for the same LoraConfig (task CAUSAL_LM)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": spec.alpha,
        "lora_bias": False,
        "lora_dropout": spec.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.rslora,
    }


def write_adapter(
    folder: str | os.PathLike,
    spec: LoRASpec,
    tensors: dict[str, torch.Tensor],
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    inputs: list[str | os.PathLike | None] = (),
    flag: str = "OUT_DIR",
) -> Path:
    """Write a PEFT adapter folder from `tensors` (our names: "layers.0.self_attn.q_proj.lora_A.weight"), saved
    in their dtype, by the output rule of qwen15.atomic (an existing folder replaced only with overwrite and only
    one qwen15 wrote; never one of `inputs`)."""
    from safetensors.torch import save_file

    try:
        with atomic_directory(
            folder, overwrite=overwrite, inputs=inputs, flag=flag, kind="peft-adapter"
        ) as tmp:
            save_file(
                {peft_key(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                str(tmp / ADAPTER_WEIGHTS),
                metadata={"format": "pt"},
            )
            config = peft_config(spec, base_model_name_or_path)
            atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    except FileExistsError as e:
        raise AdapterError(str(e)) from None
    return Path(folder)


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of `model` (one LoRASpec, as add_adapters or load_adapter made them) in PEFT's format."""
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        raise AdapterError("the model has no adapters to save (add_adapters or load_adapter first)")
    from qwen15.lora.modules import adapter_parameters

    base = base_model_name_or_path or getattr(model, "source_dir", None)
    return write_adapter(
        folder, spec, adapter_parameters(model), base_model_name_or_path=base, overwrite=overwrite
    )


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class AdapterFiles:
    """A validated adapter folder: its spec, the rank of each adapted module and the tensors' places."""

    folder: Path
    spec: LoRASpec
    config: dict[str, Any]
    ranks: dict[str, int]  # module name ("layers.0.self_attn.q_proj") -> r
    entries: dict[str, TensorEntry]  # our parameter name -> where its bytes are

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """Read and check an adapter folder's config and safetensors header (no weights are read yet)."""
    folder = local_folder(folder, "adapter", needs=f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(
            f"{folder}: no {ADAPTER_CONFIG}; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(PEFT's save_pretrained, or `qwen15 convert --to peft`)"
        )
    try:
        config = read_json(config_file)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    spec = _spec_from_config(config, config_file)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        hint = (
            f" It holds {pickled.name} (a PyTorch pickle), which qwen15 never unpickles; convert it where PEFT is "
            "installed: PeftModel.from_pretrained(base, folder).save_pretrained(out, safe_serialization=True)"
            if pickled.is_file()
            else ""
        )
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}.{hint}")
    entries: dict[str, TensorEntry] = {}
    try:
        header = read_safetensors_header(weights)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    for key, entry in header.items():
        name = our_name(key[len(PREFIX) :]) if key.startswith(PREFIX) else key
        entries[name] = entry
    ranks: dict[str, int] = {}  # adapted projections; any other key is reported by check_adapter
    for name, entry in entries.items():
        m = _KEY.match(name)
        if m and m.group(3) in TARGETS and m.group(4) == "A" and len(entry.shape) == 2:
            ranks[name.rsplit(".lora_A", 1)[0]] = entry.shape[0]
    if not ranks:
        raise AdapterError(
            f"{weights}: no LoRA A matrices of Qwen projections in it (keys {_first(entries)})"
        )
    wrong = sorted(f"{n} has r {r}" for n, r in ranks.items() if r != spec.r)
    if wrong:
        raise AdapterError(
            f"{weights}: {config_file.name} says r {spec.r} but {', '.join(wrong[:4])}; the files do not belong "
            "together"
        )
    kinds = sorted({n.rsplit(".", 1)[1] for n in ranks}, key=TARGETS.index)
    spec = LoRASpec(spec.r, spec.alpha, spec.dropout, spec.rslora, tuple(kinds))
    return AdapterFiles(folder, spec, config, ranks, entries)


def _first(entries: dict, n: int = 3) -> str:
    return ", ".join(list(entries)[:n]) + (" ..." if len(entries) > n else "") if entries else "none"


def _spec_from_config(config: dict[str, Any], where: Path) -> LoRASpec:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f'{where}: peft_type is {peft_type!r}; only LoRA adapters ("LORA") can be loaded')
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterError(f'{where}: task_type is {task!r}; a language-model adapter has "CAUSAL_LM"')
    for key, why in UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, [], ""):
            raise AdapterError(
                f"{where}: {key} is {config[key]!r}: {why}, which qwen15 cannot apply. Merge the adapter with PEFT "
                "(merge_and_unload, save_pretrained) and use the merged model instead"
            )
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{where}: bias is {config['bias']!r}: the adapter trained biases of the base model, which qwen15 "
            "cannot apply; merge it with PEFT (merge_and_unload) and use the merged model instead"
        )
    targets = config.get("target_modules")
    if isinstance(targets, list):
        foreign = [t for t in targets if t not in TARGETS]
        if foreign:
            raise AdapterError(
                f"{where}: target_modules names {', '.join(map(repr, foreign))}, which a Qwen1.5 model does not "
                f"have as adaptable projections ({', '.join(TARGETS)}); is it an adapter for another architecture?"
            )
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = config.get("use_rslora", False)
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(rslora, bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    try:
        return LoRASpec(r, alpha, float(dropout), rslora, TARGETS).validate(where=f"{where}: adapter")
    except (LoRAError, TypeError, ValueError) as e:
        msg = str(e).replace("adapter.alpha", "lora_alpha").replace("adapter.dropout", "lora_dropout")
        raise AdapterError(msg.replace("adapter.r ", "r ")) from None


def check_adapter(adapter: AdapterFiles, model: nn.Module) -> None:
    """Refuse an adapter whose tensors do not fit `model`: unknown modules, missing halves, other shapes."""
    config = model.config
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    expected: dict[str, tuple[int, ...]] = {}
    for module, r in adapter.ranks.items():
        m = _KEY.match(f"{module}.lora_A.weight")
        layer, kind = int(m.group(1)), m.group(3)
        if layer >= config.num_hidden_layers or kind not in dims:
            continue  # reported as unexpected
        part = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        if m.group(2) != part:
            continue
        n_in, n_out = dims[kind]
        expected[peft_key(f"{module}.lora_A.weight")] = (r, n_in)
        expected[peft_key(f"{module}.lora_B.weight")] = (n_out, r)
    found = {peft_key(k): e.shape for k, e in adapter.entries.items()}
    check_names(
        expected,
        found,
        False,
        str(adapter.folder / ADAPTER_WEIGHTS),
        subject="the adapter does not fit this base model",
        hint=f"Is it an adapter for another model ({adapter.base_model_name_or_path or 'base not named'})? "
        f"This model has {config.num_hidden_layers} layers, hidden size {h}, intermediate size {i}, "
        f"{config.num_key_value_heads} key/value heads",
    )


@torch.no_grad()
def load_adapter(
    model: nn.Module, folder: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply the PEFT LoRA adapter in `folder` to `model` (a Qwen as loaded, before prepare_for_inference), in
    place: the targeted projections become LoRALinears holding the adapter's weights, in `dtype` (default the
    model's). Returns the model, with `adapter_dir` and `lora_spec` set. Config, names and shapes are checked
    first: nothing is changed when they do not fit."""
    from safetensors.torch import load_file

    adapter = read_adapter(folder)
    check_adapter(adapter, model)
    tensors = load_file(str(adapter.folder / ADAPTER_WEIGHTS))  # adapters are small: read whole
    dtype = dtype or next(model.parameters()).dtype
    modules = add_adapters(model, adapter.spec, dtype=dtype, ranks=adapter.ranks)
    for name, module in modules.items():
        copy_full_(module.lora_A.weight, tensors[peft_key(f"{name}.lora_A.weight")])
        copy_full_(module.lora_B.weight, tensors[peft_key(f"{name}.lora_B.weight")])
    model.adapter_dir = str(adapter.folder)
    model.lora_spec = adapter.spec
    return model
