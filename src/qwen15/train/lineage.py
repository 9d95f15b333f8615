"""Lineage: which checkpoints continue which, so that resuming never mixes two runs.

Every checkpoint's trainer_state.json carries `lineage`: an id shared by all checkpoints of one uninterrupted
history, and the parent (lineage id and step) it branched from. Resuming from a run directory's newest checkpoint
continues its lineage. Anything else starts a new one: resuming from an older checkpoint (say with a new learning
rate), from another run's checkpoint, or starting over (`checkpoint.resume never`) in a directory that holds
checkpoints. Then the checkpoints that are not history of the new lineage (every later one, or all of them) are
moved to `CHECKPOINT_DIR/abandoned/<time>/` with a copy of metrics.jsonl, loudly: `resume: auto` can never pick
them up later, and nothing is deleted.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import yaml

# Keys a resumed run may change without it meaning another training: where to stop, how to resume, logging.
_RESUME_KEYS = ("checkpoint.resume", "train.stop_at", "checkpoint.every", "checkpoint.keep")
_RESUME_SECTIONS = ("metrics.",)


def new_lineage(parent: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex[:12], "parent": parent, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def lineage_of(trainer_state: dict[str, Any]) -> dict[str, Any]:
    """The lineage recorded in a checkpoint (checkpoints from before lineages existed: one unnamed lineage)."""
    found = trainer_state.get("lineage")
    return found if isinstance(found, dict) and "id" in found else {"id": "unrecorded", "parent": None}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved_config: Path, current: dict[str, Any]) -> list[str]:
    """`key old -> new` for every setting in which `current` (a TrainConfig as a dict) differs from the config a
    checkpoint was written with (its train_config.yaml), apart from stopping, resuming and logging."""
    try:
        old = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ["(the checkpoint's train_config.yaml cannot be read)"]
    if not isinstance(old, dict):
        return []
    before, after = _flat(old), _flat(current)
    changed = []
    for key in sorted(before.keys() | after.keys()):
        if key in _RESUME_KEYS or key.startswith(_RESUME_SECTIONS):
            continue
        if before.get(key) != after.get(key):
            changed.append(f"{key} {before.get(key)!r} -> {after.get(key)!r}")
    return changed
