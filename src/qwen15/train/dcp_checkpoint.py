"""Training checkpoints with torch.distributed.checkpoint (DCP): atomic, the last K kept, resharding on load.

One checkpoint is a folder `step-XXXXXXXX/` under the checkpoint directory (shared by all nodes):
  state/                 DCP files: model and optimizer, saved shard by shard by every rank, with global shapes
                         and full-model names (the optimizer state flattened per parameter name), so they load
                         into any number of processes and any layout: FSDP2, TP, pipeline stages (DCP reshards)
                         (a LoRA run saves only the trainable adapters and their optimizer state: the frozen base
                         is read again from model.path)
  rng/rank-NNNNN.safetensors   each rank's RNG states
  trainer_state.json     step, data position (RowSampler), tokens seen, layout, chat flag, generation settings
  train_config.yaml      the resolved recipe
  config.json + tokenizer files  what `qwen15 convert --to hf` needs to write a Hugging Face folder
  COMPLETE               written last: the step, the process count, and the size of every file above
It is written as `.step-XXXXXXXX.partial/` and renamed when complete; only folders with COMPLETE are ever read,
so a run killed while saving resumes from the previous complete checkpoint. Before one is read, its files are
checked against the sizes in COMPLETE (`checkpoint_problem`): a damaged checkpoint (a truncated or lost file, an
unreadable trainer_state.json) is named, and resuming falls back to the one before it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qwen15.atomic import atomic_write_text, fsync_dir, fsync_tree
from qwen15.errors import UserError
from qwen15.parallel.process_group import DistEnv, barrier

MARKER = "COMPLETE"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointNotFound(UserError):
    """No usable checkpoint where one was named."""


class DamagedCheckpoint(CheckpointNotFound):
    """A checkpoint marked complete whose files are not what was written."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name).group(1))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint, checked cheaply (files present with the sizes recorded at save,
    trainer_state.json readable), or None when nothing is."""
    try:
        info = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {MARKER} marker is unreadable"
    files = info.get("files") if isinstance(info, dict) else None
    if isinstance(files, dict):
        for rel, size in files.items():
            f = checkpoint / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return (
                    f"{rel} has {f.stat().st_size} bytes where {size} were written (truncated or overwritten)"
                )
    else:  # saved before sizes were recorded: the files that must be there
        for rel in ("state/.metadata", STATE, "config.json"):
            if not (checkpoint / rel).is_file():
                return f"{rel} is missing"
        if not any(f.stat().st_size for f in (checkpoint / "state").glob("*.distcp")):
            return "state/ holds no .distcp data"
    try:
        state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{STATE} cannot be read ({getattr(e, 'msg', None) or e})"
    missing = [k for k in ("step", "world_size", "sampler") if not isinstance(state, dict) or k not in state]
    if missing:
        return f"{STATE} lacks {', '.join(missing)}"
    return None


def validate_checkpoint(checkpoint: Path) -> Path:
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise DamagedCheckpoint(
            f"{checkpoint}: damaged checkpoint ({problem}); use an earlier one (or the run directory: its latest "
            "intact checkpoint is used)"
        )
    return checkpoint


def latest_intact(folder: Path, warn: Callable[[str], None] | None = None) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint of `folder` that passes `checkpoint_problem`, and the damaged ones newer
    than it (each reported through `warn`)."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(folder)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append(checkpoint)
        if warn is not None:
            warn(
                f"WARNING: checkpoint {checkpoint} is damaged ({problem}); falling back to the one before it"
            )
    return None, damaged


def resolve_checkpoint(path: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """An intact checkpoint folder from a checkpoint, a checkpoint directory or a run directory (its latest intact
    one; damaged newer ones are reported through `warn`). A checkpoint named itself must be intact."""
    path = Path(path)
    if (path / MARKER).is_file():
        return validate_checkpoint(path)
    if _NAME.match(path.name) or path.name.endswith(".partial"):
        if not path.exists():
            raise CheckpointNotFound(f"{path}: no such checkpoint")
        raise CheckpointNotFound(
            f"{path}: incomplete checkpoint (no {MARKER} marker: the run stopped while writing it); use an "
            "earlier one"
        )
    if path.exists() and not path.is_dir():
        raise CheckpointNotFound(f"{path}: is a file, not a checkpoint folder or run directory")
    for folder in (path, path / "checkpoints"):
        found, damaged = latest_intact(folder, warn)
        if found:
            return found
        if damaged:
            raise DamagedCheckpoint(
                f"{folder}: every complete checkpoint here is damaged ({damaged[-1].name} ...)"
            )
    what = "no such folder" if not path.exists() else "no complete checkpoint here"
    raise CheckpointNotFound(
        f"{path}: {what} (expected a step-XXXXXXXX folder with a {MARKER} marker, or a run/checkpoint directory "
        "holding some)"
    )


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(
            f"{checkpoint / STATE}: cannot be read ({getattr(e, 'msg', None) or e})"
        ) from None


def set_aside(checkpoints: list[Path], folder: Path, why: str) -> Path | None:
    """Move checkpoints out of the listing (never read again, nothing deleted) into folder/why/<time>/."""
    if not checkpoints:
        return None
    target = folder / why / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{n}")
    target.mkdir(parents=True)
    for checkpoint in checkpoints:
        os.replace(checkpoint, target / checkpoint.name)
    fsync_dir(folder)
    return target


def _manifest(folder: Path) -> dict[str, int]:
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MARKER
    }


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int, env: DistEnv, trainable_only: bool = False):
        self.folder = Path(folder)
        self.keep = keep
        self.env = env
        self.trainable_only = trainable_only  # frozen parameters (a LoRA base) are not saved

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.folder)
        return found[-1] if found else None

    def latest_intact(self, warn: Callable[[str], None]) -> Path | None:
        """The newest intact checkpoint; damaged newer ones are reported and moved to damaged/ (rank 0)."""
        found, damaged = latest_intact(self.folder, warn if self.env.is_main else None)
        barrier()
        if self.env.is_main and damaged:
            where = set_aside(damaged, self.folder, "damaged")
            warn(f"WARNING: moved the damaged checkpoint(s) to {where}")
        barrier()
        return found

    def remove_partial(self) -> None:
        """Leftovers of a run killed while saving (never read; removed at start by rank 0)."""
        if self.env.is_main and self.folder.is_dir():
            for p in [*self.folder.glob(".step-*.partial"), *self.folder.glob(".step-*.old")]:
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    def save(
        self,
        step: int,
        model: nn.Module | list[nn.Module],
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        trainer_state: dict[str, Any],
        write_files: Callable[[Path], None],
    ) -> Path:
        """Every rank calls this. `write_files(folder)` adds rank 0's small files (configs, tokenizer)."""
        final = self.folder / step_name(step)
        tmp = self.folder / f".{step_name(step)}.partial"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        state, _ = _state_dicts(model, optimizer, self.trainable_only)
        dcp.save(state, checkpoint_id=str(tmp / "state"))
        _save_rng(tmp / "rng" / f"rank-{self.env.rank:05d}.safetensors")
        barrier()
        if self.env.is_main:
            trainer_state = dict(trainer_state, step=step, saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            atomic_write_text(tmp / STATE, json.dumps(trainer_state, indent=2) + "\n")
            write_files(tmp)
            fsync_tree(tmp)
            marker = {"step": step, "world_size": self.env.world_size, "files": _manifest(tmp)}
            atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1) + "\n")
            old = None
            if final.exists():  # re-saving a step (a resumed run that went back): replace it whole
                old = self.folder / f".{step_name(step)}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            for stale in complete_checkpoints(self.folder)[: -self.keep]:
                _remove_checkpoint(stale)
        barrier()
        return final

    def load(
        self,
        checkpoint: Path,
        model: nn.Module | list[nn.Module],
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        layout: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Model, optimizer and this rank's RNG from `checkpoint` (saved by any number of processes, under any
        layout). `layout`: this run's layout, to restore the RNG only where rank i is the same role as before."""
        state, parts = _state_dicts(model, optimizer, self.trainable_only)
        try:
            dcp.load(state, checkpoint_id=str(checkpoint / "state"))
        except Exception as e:  # damage the size check cannot see (same size, other bytes)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedCheckpoint(f"{checkpoint}: the weights cannot be read ({first[:300]})") from e
        options = _TRAINABLE_OPTIONS if self.trainable_only else _OPTIONS
        for module, opt, model_keys, optim_keys in parts:
            set_model_state_dict(module, {k: state["model"][k] for k in model_keys}, options=options)
            set_optimizer_state_dict(module, opt, {k: state["optim"][k] for k in optim_keys}, options=options)
        trainer_state = read_trainer_state(checkpoint)
        rng_file = checkpoint / "rng" / f"rank-{self.env.rank:05d}.safetensors"
        same_layout = layout is None or trainer_state.get("layout", layout) == layout
        if trainer_state.get("world_size") == self.env.world_size and same_layout and rng_file.is_file():
            _load_rng(rng_file)
            trainer_state["rng_restored"] = True
        else:
            # Another process count: there is no rank-to-rank mapping of random streams. Full training draws no
            # random numbers (no dropout), so a fresh seed per (step, rank) changes nothing in the result; LoRA
            # dropout is reseeded by the trainer (per data-parallel rank).
            torch.manual_seed(trainer_state["step"] * 100_003 + self.env.rank)
            trainer_state["rng_restored"] = False
        return trainer_state


# Optimizer state keyed by parameter name ("state.layers.3.mlp.up_proj.weight.exp_avg"), not by position in
# one optimizer: pipeline stages hold different parameters and one optimizer each, and a checkpoint must load
# into any split of the model.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_TRAINABLE_OPTIONS = StateDictOptions(
    flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False
)


def _state_dicts(model, optimizer, trainable_only: bool = False) -> tuple[dict[str, dict], list]:
    """{"model": ..., "optim": ...} over all of this rank's model parts (whole model or pipeline stages), and per
    part (module, optimizer, its model keys, its optimizer keys) to hand the loaded values back. trainable_only:
    the parameters that train (no frozen ones, no buffers such as an int8 base's)."""
    models = list(model) if isinstance(model, list | tuple) else [model]
    optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    state: dict[str, dict] = {"model": {}, "optim": {}}
    parts = []
    options = _TRAINABLE_OPTIONS if trainable_only else _OPTIONS
    for module, opt in zip(models, optimizers, strict=True):
        m = get_model_state_dict(module, options=options)
        if trainable_only:
            trained = {name for name, p in module.named_parameters() if p.requires_grad}
            m = {k: v for k, v in m.items() if k in trained}
        o = get_optimizer_state_dict(module, opt, options=options)
        state["model"].update(m)
        state["optim"].update(o)
        parts.append((module, opt, list(m), list(o)))
    return state, parts


def _remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint without ever leaving a half-deleted one in sight: renamed out of the listing first."""
    hidden = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path))


def _load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
