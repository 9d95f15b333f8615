"""LoRA training on 2 and 4 processes (CPU, gloo, spawned; torch.set_num_threads(1) in each) against the PEFT +
transformers + AdamW oracle on the same global batch: FSDP2 x 2, TP 2 (adapters split with their projection),
FSDP2 with activation checkpointing and train.compile, FSDP2 x TP 2; a run that moves from FSDP2 to TP 2 to one
process through its checkpoints. Tolerances as for full training (test_parallel_train.py): losses 1e-5 relative,
adapters 1e-4 absolute."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_lora_helpers import checkpoint_adapters, lora_overrides, reference_lora_training
from test_train_helpers import config, make_dataset, max_abs_diff, overrides, train_in_processes

pytest.importorskip("peft")
pytestmark = pytest.mark.slow


def _check(result: dict, reference) -> None:
    ref_losses, ref_adapters = reference
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert max_abs_diff(checkpoint_adapters(Path(result["checkpoint"])), ref_adapters) < 1e-4


def test_lora_on_two_and_four_processes_equals_one(tmp_path):
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "pad", "pad")
    lora = lora_overrides()
    moving = tmp_path / "moving"
    jobs = {
        "fsdp2": overrides(data, tmp_path / "fsdp", parallel__dp_shard=2, **lora),
        "tp2": overrides(data, tmp_path / "tp", parallel__tp=2, parallel__dp_shard=1, **lora),
        "fsdp2-ac-compile": overrides(
            data, tmp_path / "ac", train__activation_checkpointing=True, train__compile=True, **lora
        ),
        "moving-fsdp2": overrides(data, moving, train__steps=6, train__stop_at=2, **lora),
        "moving-tp2": overrides(
            data, moving, train__steps=6, train__stop_at=4, parallel__tp=2, parallel__dp_shard=1, **lora
        ),
    }
    results = dict(zip(jobs, train_in_processes(2, list(jobs.values()))))
    (hybrid,) = train_in_processes(4, [overrides(data, tmp_path / "hybrid", parallel__tp=2, **lora)])
    lines = []
    last = train(config(data, moving, train__steps=6, **lora), echo=lines.append)

    reference = reference_lora_training(data)
    for name in ("fsdp2", "tp2", "fsdp2-ac-compile"):
        _check(results[name], reference)
    _check(hybrid, reference)
    ref6_losses, ref6_adapters = reference_lora_training(data, steps=6, **{"train.steps": 6})
    moved = results["moving-fsdp2"]["losses"] + results["moving-tp2"]["losses"] + last.losses
    assert moved == pytest.approx(ref6_losses, rel=1e-5)
    assert max_abs_diff(checkpoint_adapters(last.last_checkpoint), ref6_adapters) < 1e-4
    assert any("(tp 2)" in m and "resharded" in m for m in lines), lines
