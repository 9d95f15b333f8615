"""Data parallel on CPU with gloo: 2 and 4 processes (FSDP2) train exactly like one process on the same global
batch, checkpoints reshard across process counts, and torchrun launches the real command line.

Every run is compared with the single-process reference loop by train_helpers.assert_matches_reference
(losses, the relative error of the weight update, the largest weight difference; the tolerances and the noise
they were set from are written there). The only differences are fp32 summation orders (gradients reduced across
ranks, micro-batches accumulated in another order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import (
    assert_matches_reference,
    assert_run_matches_reference,
    checkpoint_weights,
    make_dataset,
    overrides,
    reference_training,
    train_in_processes,
)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_data_parallel_equals_one_process(tmp_path, world):
    """Global batch 8, micro-batch 2: 2 processes accumulate 2 micro-batches each, 4 processes one each; pad and
    pack layouts (pack with the chunked loss, and with selective activation checkpointing under FSDP2: the
    documents reach the recomputation)."""
    pad = make_dataset(tmp_path / "pad", "pad")
    pack = make_dataset(tmp_path / "pack", "pack")
    results = train_in_processes(
        world,
        [
            overrides(pad, tmp_path / "run-pad"),
            overrides(pack, tmp_path / "run-pack", train__loss_chunk_size=7),
            overrides(pack, tmp_path / "run-selective", train__activation_checkpointing="selective"),
        ],
    )
    assert_run_matches_reference(results[0], reference_training(pad))
    pack_reference = reference_training(pack)
    assert_run_matches_reference(results[1], pack_reference)
    assert_run_matches_reference(results[2], pack_reference)


def test_resume_with_another_process_count_reshards_and_continues_the_data(tmp_path):
    """2 processes train steps 1-3 of 6 and stop; one process resumes for steps 4-6. DCP reshards weights and
    AdamW state; the data order continues from the global position (row 24 of the global order)."""
    from train_helpers import config

    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pack")
    run = tmp_path / "run"
    first = train_in_processes(2, [overrides(data, run, train__steps=6, train__stop_at=3)])[0]
    state = json.loads((Path(first["checkpoint"]) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["position"] == 24
    lines = []
    second = train(config(data, run, train__steps=6), echo=lines.append)
    assert any("written by 2 process(es)" in m and "row 24" in m for m in lines)
    reference = reference_training(data, steps=6, **{"train.steps": 6})
    assert_matches_reference(
        first["losses"] + second.losses, checkpoint_weights(second.last_checkpoint), reference
    )


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_four(tmp_path):
    from train_helpers import config

    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pad")
    run = tmp_path / "run"
    first = train(config(data, run, train__steps=6, train__stop_at=2), echo=lambda m: None)
    second = train_in_processes(4, [overrides(data, run, train__steps=6)])[0]
    reference = reference_training(data, steps=6, **{"train.steps": 6})
    weights = checkpoint_weights(Path(second["checkpoint"]))
    assert_matches_reference(first.losses + second["losses"], weights, reference)


@pytest.mark.slow
def test_compile_and_activation_checkpointing_under_fsdp(tmp_path):
    """torch.compile of the blocks and activation checkpointing change nothing but speed and memory."""
    data = make_dataset(tmp_path / "data", "pack")
    result = train_in_processes(
        2,
        [overrides(data, tmp_path / "run", train__compile=True, train__activation_checkpointing=True)],
    )[0]
    assert_run_matches_reference(result, reference_training(data))


@pytest.mark.slow
def test_torchrun_command_line_two_processes_then_export(tmp_path):
    """The real launch: torchrun --standalone (a free port chosen by the OS) running `qwen15 train`, then
    `qwen15 convert` of the 2-process checkpoint."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    data = make_dataset(tmp_path / "data", "pad")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "qwen15.cli", "train", "--config", "tiny"]
    cmd += overrides(data, tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu (dp_shard 2)" in proc.stdout
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    reference = reference_training(data)
    from qwen15 import Qwen
    from qwen15.cli import main

    assert (
        main(["convert", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "float32"])
        == 0
    )
    exported = Qwen.from_pretrained(tmp_path / "hf").state_dict()
    assert_matches_reference(losses, exported, reference)


def test_finetune_from_hf_folder_in_two_processes(tmp_path):
    """Each rank reads only its FSDP shard of every tensor from the memory-mapped safetensors; the run equals the
    reference loop started from our own load of the folder."""
    from qwen15 import Qwen, get_preset

    from conftest import random_hf_model

    cfg = get_preset("tiny-gqa").replace(vocab_size=256)
    random_hf_model(cfg, seed=2).save_pretrained(tmp_path / "hf")
    data = make_dataset(tmp_path / "data", "pack")
    args = overrides(
        data,
        tmp_path / "run",
        train__mode="finetune",
        model__path=tmp_path / "hf",
        drop=("model.preset", "model.vocab_size", "model.init_seed"),
    )
    result = train_in_processes(2, [args])[0]
    assert_run_matches_reference(
        result, reference_training(data, model=Qwen.from_pretrained(tmp_path / "hf"))
    )
