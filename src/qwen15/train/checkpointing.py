"""Training checkpoints with torch.distributed.checkpoint (DCP): atomic, the last K kept, resharding on load.

One checkpoint is a folder `step-XXXXXXXX/` under the checkpoint directory (shared by all nodes):
  state/                 DCP files: model and optimizer, saved shard by shard by every rank, with global shapes
                         and full-model names (the optimizer state flattened per parameter name), so they load
                         into any number of processes and any layout: FSDP2, TP, pipeline stages (DCP reshards)
  rng/rank-NNNNN.safetensors   each rank's RNG states
  trainer_state.json     step, data position (RowSampler), tokens seen, layout, chat flag, generation settings
  train_config.yaml      the resolved recipe
  config.json + tokenizer files  what `qwen15 convert --to hf` needs to write a Hugging Face folder
  COMPLETE               written last
It is written as `.step-XXXXXXXX.partial/` and renamed when complete; only folders with COMPLETE are ever read,
so a run killed while saving resumes from the previous complete checkpoint.
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

from qwen15.atomic import _fsync_dir, atomic_write_text
from qwen15.errors import UserError
from qwen15.train.distributed import DistEnv, barrier

MARKER = "COMPLETE"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointNotFound(UserError):
    """No usable checkpoint where one was named."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder from a checkpoint, a checkpoint directory or a run directory (its latest)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if _NAME.match(path.name) or path.name.endswith(".partial"):
        raise CheckpointNotFound(
            f"{path}: incomplete checkpoint (no {MARKER} marker: the run stopped while writing it); use an "
            "earlier one"
        )
    for folder in (path, path / "checkpoints"):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    raise CheckpointNotFound(
        f"{path}: no complete checkpoint here (expected a step-XXXXXXXX folder with a {MARKER} marker, or a "
        "run/checkpoint directory holding some)"
    )


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int, env: DistEnv):
        self.folder = Path(folder)
        self.keep = keep
        self.env = env

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.folder)
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Leftovers of a run killed while saving or deleting (never read; removed at start by rank 0)."""
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
        state, _ = _state_dicts(model, optimizer)
        dcp.save(state, checkpoint_id=str(tmp / "state"))
        _save_rng(tmp / "rng" / f"rank-{self.env.rank:05d}.safetensors")
        barrier()
        if self.env.is_main:
            trainer_state = dict(trainer_state, step=step, saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            atomic_write_text(tmp / STATE, json.dumps(trainer_state, indent=2) + "\n")
            write_files(tmp)
            _fsync_tree(tmp)
            atomic_write_text(
                tmp / MARKER, json.dumps({"step": step, "world_size": self.env.world_size}) + "\n"
            )
            old = None
            if final.exists():  # re-saving a step (a resumed run that went back): replace it whole
                old = self.folder / f".{step_name(step)}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
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
        state, parts = _state_dicts(model, optimizer)
        dcp.load(state, checkpoint_id=str(checkpoint / "state"))
        for module, opt, model_keys, optim_keys in parts:
            set_model_state_dict(module, {k: state["model"][k] for k in model_keys}, options=_OPTIONS)
            set_optimizer_state_dict(
                module, opt, {k: state["optim"][k] for k in optim_keys}, options=_OPTIONS
            )
        trainer_state = read_trainer_state(checkpoint)
        rng_file = checkpoint / "rng" / f"rank-{self.env.rank:05d}.safetensors"
        same_layout = layout is None or trainer_state.get("layout", layout) == layout
        if trainer_state.get("world_size") == self.env.world_size and same_layout and rng_file.is_file():
            _load_rng(rng_file)
            trainer_state["rng_restored"] = True
        else:
            # Another process count: there is no rank-to-rank mapping of random streams. Training draws no random
            # numbers (no dropout), so a fresh seed per (step, rank) changes nothing in the result.
            torch.manual_seed(trainer_state["step"] * 100_003 + self.env.rank)
            trainer_state["rng_restored"] = False
        return trainer_state


# Optimizer state keyed by parameter name ("state.layers.3.mlp.up_proj.weight.exp_avg"), not by position in
# one optimizer: pipeline stages hold different parameters and one optimizer each, and a checkpoint must load
# into any split of the model.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(model, optimizer) -> tuple[dict[str, dict], list]:
    """{"model": ..., "optim": ...} over all of this rank's model parts (whole model or pipeline stages), and per
    part (module, optimizer, its model keys, its optimizer keys) to hand the loaded values back."""
    models = list(model) if isinstance(model, list | tuple) else [model]
    optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    state: dict[str, dict] = {"model": {}, "optim": {}}
    parts = []
    for module, opt in zip(models, optimizers, strict=True):
        m = get_model_state_dict(module, options=_OPTIONS)
        o = get_optimizer_state_dict(module, opt, options=_OPTIONS)
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


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
