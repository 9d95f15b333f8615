"""The real Trainer under tensor, pipeline and hybrid layouts (CPU, gloo, spawned processes) against the
independent single-process reference loop of tests/test_train_helpers.py, on the same global batch.

Compared by test_train_helpers.assert_matches_reference (as for data parallel in test_train_distributed.py; the
tolerances and the measured noise are written there). The layouts compute the same fp32 arithmetic in another
order: partial sums of row-parallel matmuls all-reduced, the vocabulary-parallel loss assembled from per-shard
max / sum-of-exponentials, gradients summed over micro-batches and ranks.
"""

from __future__ import annotations

from pathlib import Path

from test_train_helpers import (
    BASE,
    assert_matches_reference,
    assert_run_matches_reference,
    checkpoint_weights,
    make_dataset,
    max_abs_diff,
    overrides,
    reference_training,
    train_in_processes,
)

# Untied, GQA 4/2, 4 layers: splits over tp 2 and into 4 pipeline stages (Interleaved1F1B: 2 per rank).
PIPE_SHAPE = {"model__preset": "tiny-gqa", "model__num_hidden_layers": 4}


def _reference(data: Path, shape: dict, steps: int | None = None, **changes):
    from qwen15 import Qwen, get_preset

    cfg = get_preset(shape.get("model__preset", BASE["model.preset"])).replace(
        vocab_size=BASE["model.vocab_size"]
    )
    if "model__num_hidden_layers" in shape:
        cfg = cfg.replace(num_hidden_layers=shape["model__num_hidden_layers"])
    model = Qwen.from_config(cfg, seed=BASE["model.init_seed"])
    return reference_training(data, steps=steps, model=model, **changes)


def test_tensor_and_pipeline_parallel_training_on_two_processes(tmp_path):
    """TP 2 (tied 0.5B-like model with the chunked vocabulary-parallel loss on packed rows; GQA without sequence
    parallel) and PP 2 with each schedule: 8 rows per step, micro-batches of 2 (4 per step)."""
    pad = make_dataset(tmp_path / "pad", "pad")
    pack = make_dataset(tmp_path / "pack", "pack")
    jobs = {
        "tp2-tied-chunked": overrides(
            pack, tmp_path / "tp-tied", parallel__tp=2, train__loss_chunk_size=7, parallel__dp_shard=1
        ),
        "tp2-gqa-no-sp": overrides(
            pad, tmp_path / "tp-gqa", parallel__tp=2, parallel__sequence_parallel=False, **PIPE_SHAPE
        ),
    }
    for schedule in ("1F1B", "GPipe", "Interleaved1F1B"):
        jobs[f"pp2-{schedule}"] = overrides(
            pack, tmp_path / f"pp-{schedule}", parallel__pp=2, parallel__pp_schedule=schedule, **PIPE_SHAPE
        )
    results = dict(zip(jobs, train_in_processes(2, list(jobs.values()))))
    assert_run_matches_reference(results["tp2-tied-chunked"], _reference(pack, {}))
    assert_run_matches_reference(results["tp2-gqa-no-sp"], _reference(pad, PIPE_SHAPE))
    pipe_reference = _reference(pack, PIPE_SHAPE)
    for schedule in ("1F1B", "GPipe", "Interleaved1F1B"):
        assert_run_matches_reference(results[f"pp2-{schedule}"], pipe_reference)


def test_hybrid_layouts_on_four_processes(tmp_path):
    """FSDP 2 x TP 2, PP 2 x TP 2, and HSDP (dp_replicate 2 x dp_shard 2): each data-parallel rank reads its
    rows, the tensor/pipeline ranks of one data-parallel rank the same rows."""
    pack = make_dataset(tmp_path / "pack", "pack")
    jobs = {
        "fsdp2-tp2": overrides(pack, tmp_path / "fsdp-tp", parallel__tp=2, **PIPE_SHAPE),
        "pp2-tp2": overrides(pack, tmp_path / "pp-tp", parallel__tp=2, parallel__pp=2, **PIPE_SHAPE),
        "hsdp": overrides(pack, tmp_path / "hsdp", parallel__dp_replicate=2, **PIPE_SHAPE),
    }
    results = dict(zip(jobs, train_in_processes(4, list(jobs.values()))))
    reference = _reference(pack, PIPE_SHAPE)
    for name in jobs:
        assert_run_matches_reference(results[name], reference)


def test_checkpoint_moves_between_layouts_and_exports_from_any(tmp_path):
    """dp 4 trains steps 1-2, tp 2 x pp 2 steps 3-4 from its checkpoint, one process steps 5-6: the same losses
    and weights as the uninterrupted single-process run. The tp 2 x pp 2 checkpoint exports to a Hugging Face
    folder that transformers loads with the logits of our model holding the checkpoint's weights."""
    import torch
    from test_train_helpers import config

    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pack")
    run = tmp_path / "run"
    first, second = train_in_processes(
        4,
        [
            overrides(data, run, train__steps=6, train__stop_at=2, parallel__dp_shard=4, **PIPE_SHAPE),
            overrides(
                data, run, train__steps=6, train__stop_at=4, parallel__tp=2, parallel__pp=2, **PIPE_SHAPE
            ),
        ],
    )
    lines = []
    third = train(config(data, run, train__steps=6, **PIPE_SHAPE), echo=lines.append)
    assert any("(tp 2 x pp 2" in m and "resharded" in m and "row 32" in m for m in lines), lines
    reference = _reference(data, PIPE_SHAPE, steps=6, **{"train.steps": 6})
    losses = first["losses"] + second["losses"] + third.losses
    assert_matches_reference(losses, checkpoint_weights(third.last_checkpoint), reference)

    from transformers import Qwen2ForCausalLM

    from qwen15 import Qwen
    from qwen15.cli import main

    pp_tp_checkpoint = Path(second["checkpoint"])
    assert pp_tp_checkpoint.name == "step-00000004"
    out = tmp_path / "hf"
    assert main(["convert", "--to", "hf", str(pp_tp_checkpoint), str(out), "--dtype", "float32"]) == 0
    weights = checkpoint_weights(pp_tp_checkpoint)
    ours = Qwen.from_pretrained(out)
    assert max_abs_diff(ours.state_dict(), weights) == 0
    hf = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, BASE["model.vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-5
