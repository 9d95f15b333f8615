"""Memory accounting against what a process really holds: parameter bytes exactly, activations (the tensors
autograd keeps for backward) within 10%; the multi-process checks (FSDP2 x TP, pipeline stages, TP activations)
are in test_parallel.py."""

import pytest
import torch
from test_parallel import activation_bytes, model_for

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
