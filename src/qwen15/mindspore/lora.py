"""MindFormers LoRA weights -> a PEFT adapter folder.

MindFormers' LoraAdapter swaps every Linear whose own cell name (wq, w_qkv, w2, ...) `re.match`es
pet_config.target_modules for mindpet's LoRADense, which adds `mindpet_delta_lora_a` [r, in] and
`mindpet_delta_lora_b` [out, r] beside the weight: y = W x + b + (lora_alpha / lora_rank) B A x, PEFT's formula.
A fused w_qkv (w_gate_hidden) has one A and a B whose rows are split like the fused weight's rows: PEFT gets q, k
and v (gate and up) adapters that share that A, each with its B rows, which computes the same function.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.atomic import check_output_folder
from qwen15.lora.modules import TARGETS, LoRASpec
from qwen15.mindspore import names as N
from qwen15.mindspore.dtypes import FLOATS, convert
from qwen15.mindspore.plan import MigrationError, Summary
from qwen15.model_config import ModelConfig

# MindFormers module (within model.layers.N.) -> our module; fused modules -> the modules they hold
MODULES = {
    k.removesuffix(".weight"): v.removesuffix(".weight")
    for k, v in N.LAYER.items()
    if k.endswith(".weight") and v.split(".")[1] in TARGETS
}
FUSED_MODULES = {
    k.removesuffix(".weight"): [p.removesuffix(".weight") for p in v] for k, v in N.FUSED.items()
}
FUSED_MODULES = {k: v for k, v in FUSED_MODULES.items() if k != "attention.w_qkv.bias"}
_LORA = re.compile(r"^model\.layers\.(\d+)\.(.+)\.mindpet_delta_lora_([ab])$")
DEFAULTS = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.01}  # MindFormers' LoraConfig defaults
PET_HINT = (
    "add the LoRA run's settings under model.model_config: pet_config: {pet_type: lora, lora_rank: R, "
    "lora_alpha: A, lora_dropout: D, target_modules: '.*wq|.*wk|.*wv|.*wo'} (the finetuning YAML of that run "
    "has them)"
)


@dataclass(frozen=True)
class PetConfig:
    """The YAML's model.model_config.pet_config of a LoRA run."""

    rank: int
    alpha: float
    dropout: float
    target_modules: str


def pet_config(section: dict[str, Any], where: str) -> PetConfig:
    """LoRA settings from a MindFormers model_config section (absent keys take MindFormers' defaults)."""
    pet = section.get("pet_config")
    if not isinstance(pet, dict):
        raise MigrationError(f"{where}: no model.model_config.pet_config; {PET_HINT}")
    kind = str(pet.get("pet_type", "")).lower()
    if kind != "lora":
        raise MigrationError(
            f"{where}: model.model_config.pet_config.pet_type is {pet.get('pet_type')!r}; only 'lora' "
            "adapters convert to PEFT"
        )
    values = {k: pet.get(k, d) if pet.get(k) is not None else d for k, d in DEFAULTS.items()}
    targets = pet.get("target_modules")
    if not isinstance(targets, str) or not targets:
        raise MigrationError(
            f"{where}: model.model_config.pet_config.target_modules is {targets!r}; give the regex of the run "
            "(e.g. '.*wq|.*wk|.*wv|.*wo')"
        )
    try:
        re.compile(targets)
    except re.error as e:
        raise MigrationError(f"{where}: pet_config.target_modules {targets!r} is not a regex ({e})") from None
    rank, alpha, dropout = values["lora_rank"], values["lora_alpha"], values["lora_dropout"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise MigrationError(f"{where}: pet_config.lora_rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise MigrationError(f"{where}: pet_config.lora_alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise MigrationError(f"{where}: pet_config.lora_dropout must lie in [0, 1), got {dropout!r}")
    return PetConfig(rank, alpha, float(dropout), targets)


def _dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """MindFormers module -> (in, out) features."""
    shapes = N.mindformers_shapes(cfg)
    out = {m: shapes[f"model.layers.0.{m}.weight"][::-1] for m in MODULES}
    for fused, parts in FUSED_MODULES.items():
        out[fused] = (out[parts[0]][0], sum(out[p][1] for p in parts))
    return out


def _tensors(cfg: ModelConfig, tensors: dict, where: str) -> tuple[dict, list[str]]:
    """(layer, module) -> {"a": source, "b": source} of the LoRA tensors, and the other tensors' names."""
    found: dict[tuple[int, str], dict[str, Any]] = {}
    others, foreign = [], []
    for name, t in tensors.items():
        if N.LORA_MARK not in name or name.startswith(N.OPTIMIZER_PREFIXES):
            others.append(name)
            continue
        m = _LORA.match(name)
        if m is None or (m.group(2) not in MODULES and m.group(2) not in FUSED_MODULES):
            foreign.append(name)
            continue
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    if foreign:
        raise MigrationError(
            f"{where}: LoRA tensors that are not on Qwen1.5 projections: {', '.join(foreign[:4])}; qwen15 "
            f"converts adapters on {', '.join([*MODULES, *FUSED_MODULES])}"
        )
    if not found:
        raise MigrationError(
            f"{where}: no MindFormers LoRA tensors (names ending in mindpet_delta_lora_a / _b); it holds base "
            "weights only: convert it with --to hf"
        )
    half = [
        f"model.layers.{n}.{m}.mindpet_delta_lora_{'b' if 'a' in ab else 'a'}"
        for (n, m), ab in found.items()
        if len(ab) < 2
    ]
    if half:
        raise MigrationError(f"{where}: the other half of a LoRA pair is missing: {', '.join(half[:4])}")
    deep = sorted({n for n, _ in found if n >= cfg.num_hidden_layers})
    if deep:
        raise MigrationError(
            f"{where}: LoRA tensors of layer {deep[0]}, but the config has num_layers {cfg.num_hidden_layers}"
        )
    return found, others


def _check(cfg: ModelConfig, pet: PetConfig, found: dict, where: str, config_where: str) -> None:
    dims, wrong, ranks = _dims(cfg), [], {}
    for (n, module), ab in sorted(found.items()):
        n_in, n_out = dims[module]
        a, b = ab["a"], ab["b"]
        ranks.setdefault((a.shape[0] if len(a.shape) == 2 else None), []).append(f"layers.{n}.{module}")
        for t, want in (
            (a, (a.shape[0] if a.shape else 0, n_in)),
            (b, (n_out, a.shape[0] if a.shape else 0)),
        ):
            if len(t.shape) != 2 or tuple(t.shape) != want:
                wrong.append(f"{t.name}: checkpoint {list(t.shape)}, config {list(want)}")
            elif t.dtype not in FLOATS:
                wrong.append(f"{t.name} is {t.dtype}, not a floating-point weight")
    if wrong:
        raise MigrationError(f"{where}: LoRA tensors that do not fit the config: {'; '.join(wrong[:6])}")
    if len(ranks) > 1:
        shown = "; ".join(f"r {r}: {', '.join(ms[:2])}" for r, ms in ranks.items())
        raise MigrationError(f"{where}: LoRA ranks differ between modules ({shown}); PEFT needs one rank")
    (rank,) = ranks
    if rank != pet.rank:
        raise MigrationError(
            f"{where}: LoRA rank {rank} in the checkpoint, but {config_where} says lora_rank {pet.rank}: is it "
            "the YAML of this run?"
        )
    order = [m.rsplit(".", 1)[1] for m in [*MODULES, *FUSED_MODULES]]
    local = sorted({m.rsplit(".", 1)[1] for _, m in found}, key=order.index)
    unmatched = [m for m in local if not re.match(pet.target_modules, m)]
    if unmatched:
        what = "matches none of" if len(unmatched) == len(local) else "does not match"
        raise MigrationError(
            f"{config_where}: pet_config.target_modules {pet.target_modules!r} {what} the modules the checkpoint "
            f"adapts ({', '.join(unmatched)}; MindFormers matches each cell's own name): is it the YAML of this run?"
        )


def _torch(array: np.ndarray, src: str, dtype: str):
    import torch

    value = convert(array, src, dtype)
    if dtype == "bfloat16":
        return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(value.copy())


def mindspore_lora_to_peft(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: str | Path,
    *,
    dtype: str = "auto",
    qkv_layout: str | None = None,
    strategy: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[Summary, LoRASpec]:
    """The LoRA tensors of a MindFormers checkpoint -> a PEFT adapter folder (the output rule of qwen15.atomic)."""
    from qwen15.lora.peft_format import write_adapter
    from qwen15.mindspore.convert import open_mindspore
    from qwen15.mindspore.mindformers_config import load_model_config

    start = time.perf_counter()
    out, where = Path(out_dir), str(checkpoint)
    inputs = [checkpoint, strategy, config]
    check_output_folder(out, overwrite=overwrite, inputs=inputs, flag="OUT_DIR")
    cfg, section = load_model_config(config)
    if Path(config).suffix == ".json":
        raise MigrationError(
            f"{config}: a config.json holds no LoRA settings; pass the MindFormers YAML of the LoRA run "
            "(its model.model_config.pet_config gives lora_rank, lora_alpha, target_modules)"
        )
    pet = pet_config(section, str(config))
    source = open_mindspore(Path(checkpoint), Path(strategy) if strategy else None)
    summary = Summary()
    try:
        found, others = _tensors(cfg, source.tensors, where)
        _check(cfg, pet, found, where, str(config))
        fused = sorted({m for _, m in found if m in FUSED_MODULES})
        if fused and qkv_layout is None:
            if N.layout_is_ambiguous(cfg, [f"{m}.weight" for m in fused]):
                raise MigrationError(
                    f"{where}: LoRA on fused {', '.join(fused)}, whose B rows are in the fused weight's row "
                    "order, which the file does not record: pass --qkv-layout concat (MindFormers up to 1.3) or "
                    "--qkv-layout interleaved (1.4 and later)"
                )
            qkv_layout = "concat"  # one key/value group, q/k/v only: both orders are the same
        stored = sorted({t.dtype for ab in found.values() for t in ab.values()})
        if dtype == "auto" and len(stored) > 1:
            raise MigrationError(
                f"{where}: LoRA tensors in {', '.join(stored)}; pass --dtype for the adapter"
            )
        out_dtype = stored[0] if dtype == "auto" else dtype
        tensors = {}
        for (n, module), ab in sorted(found.items()):
            a, b = ab["a"].read(), ab["b"].read()
            parts = FUSED_MODULES.get(module, [module])
            rows = N.fused_rows(cfg, f"{module}.weight", qkv_layout) if module in FUSED_MODULES else [None]
            for part, r in zip(parts, rows):
                name = f"layers.{n}.{MODULES[part]}"
                tensors[f"{name}.lora_A.weight"] = _torch(a, ab["a"].dtype, out_dtype)
                tensors[f"{name}.lora_B.weight"] = _torch(b if r is None else b[r], ab["b"].dtype, out_dtype)
                summary.fused += module in FUSED_MODULES
            summary.converted_dtype += [t.dtype for t in ab.values() if t.dtype != out_dtype]
        targets = sorted({k.split(".")[3] for k in tensors}, key=TARGETS.index)
        spec = LoRASpec(pet.rank, pet.alpha, pet.dropout, False, tuple(targets)).validate(where=str(config))
        if others:
            summary.skipped["base-model and training tensors (convert those with --to hf --skip-lora)"] = (
                others
            )
        summary.mapped, summary.dtype = len(tensors) // 2, out_dtype
        summary.bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        write_adapter(out, spec, tensors, overwrite=overwrite, inputs=inputs)
    finally:
        source.close()
    summary.seconds = time.perf_counter() - start
    return summary, spec
