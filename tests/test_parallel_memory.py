"""Memory accounting against what a process really holds: parameter bytes exactly, activations (the tensors
autograd keeps for backward) within 5%, and a real trainer step's memory (what stays from the forward, and the
peak) within 5% with activation checkpointing and under bf16 autocast over fp32 master weights; the multi-process
checks (FSDP2 x TP, pipeline stages, TP activations) are in test_parallel.py."""

import pytest
import torch
from parallel_harness import ACT_ROWS, ACT_SEQ, CONFIGS, PIPE_CONFIG, activation_bytes, model_for

from qwen15.model import Qwen
from qwen15.model_config import get_preset
from qwen15.parallel.layout import ParallelLayout
from qwen15.parallel.memory import (
    estimate_memory,
    head_activation_bytes,
    layer_activation_bytes,
    param_shapes,
)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa", "qwen1.5-0.5b"])
def test_param_shapes_match_the_model(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = Qwen(cfg)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert got == {n: s for n, (s, _) in param_shapes(cfg).items()}
    one = estimate_memory(cfg, ParallelLayout(dp_shard=1), micro_batch_size=1, seq_len=8, param_dtype="fp32")
    assert one.parameters == 4 * cfg.num_params() == 4 * sum(p.numel() for p in model.parameters())


def test_memory_shrinks_as_the_layout_grows():
    cfg = get_preset("qwen1.5-72b")
    kw = dict(micro_batch_size=1, seq_len=4096)
    fsdp = estimate_memory(cfg, ParallelLayout(), world_size=64, **kw)
    tp = estimate_memory(cfg, ParallelLayout(tp=8), world_size=64, **kw)
    ckpt = estimate_memory(cfg, ParallelLayout(tp=8), world_size=64, activation_checkpointing=True, **kw)
    pp = estimate_memory(cfg, ParallelLayout(tp=8, pp=4, pp_microbatches=8), world_size=64, **kw)
    # FSDP over 64 ranks: 72B x 4 bytes / 64 for parameters (within the rounding of each tensor).
    assert fsdp.parameters == pytest.approx(4 * cfg.num_params() / 64, rel=1e-3)
    assert tp.parameters == pytest.approx(fsdp.parameters, rel=0.01)  # tp x dp_shard is still 64
    assert tp.activations < fsdp.activations / 4
    assert ckpt.activations < tp.activations / 5
    assert pp.pp_rank == 0 and len(pp.per_pp_rank) == 4
    assert ckpt.total < 80 * 1024**3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-mha", "tiny-gqa"])
def test_activation_estimate_matches_saved_tensors(preset, dtype):
    cfg = get_preset(preset).replace(vocab_size=1024)
    model = model_for(cfg).to(getattr(torch, dtype))
    rows, seq = 2, 96
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
    measured = activation_bytes(model, ids, labels)
    est = estimate_memory(
        cfg,
        ParallelLayout(dp_shard=1),
        micro_batch_size=rows,
        seq_len=seq,
        param_dtype=dtype,
        compute_dtype=dtype,
    )
    b = 4 if dtype == "float32" else 2
    by_parts = cfg.num_hidden_layers * layer_activation_bytes(cfg, rows * seq, b) + head_activation_bytes(
        cfg, rows * seq, b
    )
    rotary = 2 * rows * seq * cfg.head_dim * b  # cos and sin, shared by the layers
    assert est.activations == by_parts + rotary
    assert measured == pytest.approx(est.activations, rel=0.05)


def step_memory(trainer, batch, monkeypatch) -> dict[str, int]:
    """One Trainer.train_step under the profiler's allocation records (CPU): bytes allocated since its start and
    still alive when the forward has ended ("kept": what the backward will use), and at their highest before the
    gradient clipping ("peak"). Gradients of the step before are freed (set to None), so both count this step's
    tensors only; the gradients this step allocates count in the peak as far as they exist at that moment."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from qwen15.train import trainer as T

    real_loss, real_clip = T.micro_batch_loss, T.clip_grad_norm

    def loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        with record_function("forward_done"):
            pass
        return out

    def clip(*args, **kwargs):
        with record_function("backward_done"):
            pass
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(T, "micro_batch_loss", loss)
    monkeypatch.setattr(T, "clip_grad_norm", clip)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(batch)
    events = prof.profiler.kineto_results.events()
    marks = {e.name(): e.start_ns() for e in events if e.name() in ("forward_done", "backward_done")}
    live, peak, kept = 0, 0, None
    for t, n in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if kept is None and t > marks["forward_done"]:
            kept = live
        if t > marks["backward_done"]:
            break
        live += n
        peak = max(peak, live)
    return {"kept": kept, "peak": peak}


@pytest.mark.parametrize(
    "dtype, checkpointing",
    [("bfloat16", True), ("bfloat16", False), ("float32", True), ("bfloat16", "selective")],
    ids=str,
)
@pytest.mark.parametrize("preset, vocab, rows, seq", [("tiny", 8192, 2, 256), ("tiny-gqa", 1024, 2, 512)])
def test_trainer_step_memory_matches_the_estimate(
    tmp_path, monkeypatch, preset, vocab, rows, seq, dtype, checkpointing
):
    """One process, the trainer's own step: bf16 is torch.autocast over fp32 master weights (as one GPU trains),
    with and without activation checkpointing (full, and selective), and fp32 with it; a vocabulary-heavy shape
    (the loss's backward is the peak) and a layer-heavy one (with checkpointing, a recomputed block is). What stays from the forward
    = estimate.activations, the step's peak = activations + transient, each within 5% (measured here: within
    0.2% and 3.5%)."""
    import numpy as np
    from train_helpers import overrides

    from qwen15.data.writer import write_documents
    from qwen15.train.config import load_config
    from qwen15.train.trainer import Trainer

    tokens = np.random.default_rng(0).integers(0, vocab, (rows, seq + 1)).tolist()
    data = write_documents(
        tmp_path / "data", [(r, [True] * len(r)) for r in tokens], seq_length=seq, layout="pad"
    )
    args = overrides(
        data,
        tmp_path / "run",
        model__preset=preset,
        model__vocab_size=vocab,
        train__global_batch_size=rows,
        train__micro_batch_size=rows,
        train__dtype=dtype,
        train__activation_checkpointing=checkpointing,
        checkpoint__save_at_end=False,
    )
    trainer = Trainer(load_config(None, args), echo=lambda m: None)
    try:
        batch = trainer.dataset.batch(list(range(rows)))
        trainer.train_step(batch)  # the optimizer state exists from here on; the gradients are freed
        measured = step_memory(trainer, batch, monkeypatch)
        est = estimate_memory(
            trainer.model_config,
            trainer.layout,
            micro_batch_size=rows,
            seq_len=seq,
            param_dtype="float32",
            compute_dtype=dtype,
            activation_checkpointing=checkpointing,
            autocast=trainer.autocast,
        )
    finally:
        trainer.close()
    assert trainer.autocast == (dtype == "bfloat16")
    kept, peak = measured["kept"] / est.activations, measured["peak"] / (est.activations + est.transient)
    print(
        f"{preset} {dtype} checkpointing={checkpointing}: kept / estimate {kept:.3f}, peak / estimate {peak:.3f}"
    )
    assert kept == pytest.approx(1, abs=0.05)
    if checkpointing == "selective":
        # The step's transient is over-counted by up to 7% here (peak / estimate measured 0.986 and 0.931): an
        # upper bound within 10%, not the 5% of the other cases.
        assert 0.9 <= peak <= 1.05
    else:
        assert peak == pytest.approx(1, abs=0.05)


def test_memory_estimate_is_exact_for_stored_bytes_under_fsdp_and_tp(four):
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    est = estimate_memory(
        CONFIGS["tied"],
        ParallelLayout(dp_shard=2, tp=2),
        micro_batch_size=2,
        seq_len=16,
        param_dtype="float32",
        compute_dtype="float32",
        optimizer="adamw",
    )
    for out in four:
        got = out["fsdp"]
        assert got["param_bytes"] == est.parameters
        assert got["grad_bytes"] == est.gradients
        assert got["optimizer_bytes"] == est.optimizer


def test_memory_estimate_is_exact_for_pipeline_stage_parameters(two, four):
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    for results, tp in ((two, 1), (four, 2)):
        for rank, out in enumerate(results):
            pp_rank = rank // tp
            for schedule_name, got in out["pipeline"].items():
                layout = ParallelLayout(pp=2, tp=tp, dp_shard=1, pp_schedule=schedule_name, pp_microbatches=4)
                est = estimate_memory(
                    PIPE_CONFIG,
                    layout,
                    micro_batch_size=1,
                    seq_len=16,
                    param_dtype="fp32",
                    compute_dtype="fp32",
                    pp_rank=pp_rank,
                )
                assert got["param_bytes"] == est.parameters, (schedule_name, rank)


def test_memory_estimate_activations_under_tensor_parallel(two):
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    est = estimate_memory(
        CONFIGS["gqa"],
        ParallelLayout(tp=2, dp_shard=1),
        micro_batch_size=ACT_ROWS,
        seq_len=ACT_SEQ,
        param_dtype="fp32",
        compute_dtype="fp32",
    )
    for out in two:
        ratio = out["activations"] / est.activations
        assert abs(ratio - 1) <= 0.05, f"measured / estimated activation bytes = {ratio:.3f}"
