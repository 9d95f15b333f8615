"""The parallel layout (checks against world size and model shape) and the balanced pipeline cut — single-process,
no torch.distributed."""

import itertools

import pytest
import torch

from qwen15.model import Qwen
from qwen15.model_config import get_preset
from qwen15.parallel.layout import LayoutError, ParallelLayout
from qwen15.parallel.pipeline import default_costs, split_layers, stage_indices, stage_modules, stage_ranges


def test_resolve_fills_dp_shard_and_checks_the_product():
    assert ParallelLayout(tp=2, pp=2).resolve(16).dp_shard == 4
    assert ParallelLayout(dp_replicate=2, dp_shard=2, tp=2).resolve(8).dp == 4
    with pytest.raises(LayoutError, match="world size 6 is not divisible by .* = 4"):
        ParallelLayout(tp=2, pp=2).resolve(6)
    with pytest.raises(LayoutError, match=r"2 x 1 x 2 x 2 = 8 ranks, but the world size is 16"):
        ParallelLayout(dp_shard=2, tp=2, pp=2).resolve(16)
    with pytest.raises(LayoutError, match=r"parallel.tp = 0: must be a positive integer"):
        ParallelLayout(tp=0).resolve(4)


@pytest.mark.parametrize(
    "preset, tp, message",
    [
        ("qwen1.5-4b", 8, "num_attention_heads 20 is not divisible by tp"),
        ("qwen1.5-110b", 16, "num_key_value_heads 8 is not divisible by tp"),
        ("tiny-gqa", 4, "num_key_value_heads 2 is not divisible by tp"),
    ],
)
def test_heads_that_do_not_split_are_refused(preset, tp, message):
    cfg = get_preset(preset)
    with pytest.raises(LayoutError, match=message):
        ParallelLayout(tp=tp).validate(tp * 2, cfg)


def test_real_layouts_are_accepted():
    for preset, layout, world in [
        ("qwen1.5-14b", ParallelLayout(tp=8), 16),
        ("qwen1.5-32b", ParallelLayout(tp=8, pp=2, pp_microbatches=8), 32),
        ("qwen1.5-72b", ParallelLayout(tp=8, pp=4, pp_schedule="Interleaved1F1B", pp_microbatches=8), 64),
        ("qwen1.5-110b", ParallelLayout(tp=8, pp=8, pp_schedule="GPipe", pp_microbatches=16), 64),
    ]:
        resolved = layout.validate(world, get_preset(preset))
        assert resolved.num_ranks() == world


def test_pipeline_checks():
    cfg = get_preset("tiny-gqa")  # 2 layers, untied
    with pytest.raises(LayoutError, match="only 2 layers"):
        ParallelLayout(pp=2, pp_schedule="Interleaved1F1B", pp_microbatches=2).validate(2, cfg)
    with pytest.raises(LayoutError, match="1F1B needs at least as many micro-batches as stages"):
        ParallelLayout(pp=2, pp_microbatches=1).validate(2, cfg)
    with pytest.raises(LayoutError, match="pp_schedule = 'ZeroBubble'"):
        ParallelLayout(pp=2, pp_schedule="ZeroBubble").validate(2, cfg)
    with pytest.raises(LayoutError, match="ties its output layer"):
        ParallelLayout(pp=2).validate(2, get_preset("qwen1.5-0.5b"))
    with pytest.raises(LayoutError, match="does not split into 4 equal micro-batches"):
        ParallelLayout(pp=2, pp_microbatches=4).validate(2, cfg, local_batch_size=6)
    with pytest.raises(LayoutError, match="needs a multiple of 3"):
        ParallelLayout(pp=2, pp_schedule="Interleaved1F1B", pp_microbatches=7).validate(
            2, cfg.replace(num_hidden_layers=4)
        )
    with pytest.raises(LayoutError, match="GPipe runs one stage per rank"):
        ParallelLayout(pp=2, pp_schedule="GPipe", pp_stages_per_rank=2).validate(
            2, cfg.replace(num_hidden_layers=4)
        )


def test_from_dict_names_unknown_keys():
    assert ParallelLayout.from_dict({"tp": 2, "pp": 1}).tp == 2
    with pytest.raises(LayoutError, match=r"parallel: unknown key\(s\) 'tensor_parallel'"):
        ParallelLayout.from_dict({"tensor_parallel": 2})


def _brute_force_best(num_layers, num_stages, e, o):
    best = None
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        costs = [bounds[i + 1] - bounds[i] for i in range(num_stages)]
        costs[0] += e
        costs[-1] += o
        best = max(costs) if best is None else min(best, max(costs))
    return best


@pytest.mark.parametrize(
    "layers, stages, e, o", [(8, 2, 0, 0), (24, 4, 1.5, 3.0), (13, 3, 0.7, 2.2), (9, 4, 5, 0)]
)
def test_split_layers_is_contiguous_and_minimises_the_largest_stage(layers, stages, e, o):
    ranges = split_layers(layers, stages, e, o)
    assert [i for r in ranges for i in r] == list(range(layers))
    assert all(len(r) >= 1 for r in ranges)
    costs = [len(r) for r in ranges]
    costs[0] += e
    costs[-1] += o
    assert max(costs) == pytest.approx(_brute_force_best(layers, stages, e, o))


def test_default_costs_count_the_output_layer_by_its_size():
    embed, out = default_costs(get_preset("qwen1.5-72b"))
    # vocab x hidden over one layer's parameters: 152064 x 8192 / ~0.87e9
    assert out == pytest.approx(1.43, abs=0.01) and embed == pytest.approx(out / 2)
    ranges = stage_ranges(get_preset("qwen1.5-7b"), ParallelLayout(pp=4, dp_shard=1))
    assert sum(len(r) for r in ranges) == 32 and len(ranges[-1]) < len(ranges[1])


def test_stage_modules_keep_their_layers_and_names():
    cfg = get_preset("tiny-gqa").replace(vocab_size=256, num_hidden_layers=6)
    layout = ParallelLayout(pp=2, pp_schedule="Interleaved1F1B", pp_microbatches=2, dp_shard=1)
    assert stage_indices(layout, 1) == [1, 3]
    full = Qwen.from_config(cfg, seed=0)
    names = {}
    for rank in range(2):
        for module, stage in zip(
            stage_modules(Qwen.from_config(cfg, seed=0), layout, rank), stage_indices(layout, rank)
        ):
            assert (module.embed_tokens is not None) == (stage == 0)
            assert (module.lm_head is not None) == (stage == 3)
            names.update({n: p for n, p in module.named_parameters()})
    assert set(names) == set(dict(full.named_parameters()))
    for n, p in full.named_parameters():
        assert torch.equal(names[n], p)
