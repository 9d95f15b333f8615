"""Every shipped recipe fits its GPUs by the memory model, the table in docs/parallel.md is the model's output
for the recipes as shipped, the model's stored bytes are exact for the real 0.5B width (and its activations
close to autograd's saved tensors), and bad layouts stop the trainer with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen15.model_config import ModelConfig, get_preset
from qwen15.parallel.memory import GIB, GPU_GIB, RESERVED_GIB, estimate_memory, recipe_memory

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
FULL = [p for p in RECIPES if not p.stem.startswith("lora_")]  # LoRA recipes: their table is in docs/lora.md
# Recipes that take the dataset's row length (no data.seq_length): the length their header builds the data with.
DATA_SEQ = {"tiny": 128}


def recipe_model(cfg) -> ModelConfig:
    """The recipe's model shape: its preset, or the preset named like its model folder (./Qwen1.5-72B)."""
    return get_preset(cfg.model.preset or Path(cfg.model.path).name.lower())


def layout_text(cfg, world: int) -> str:
    p = cfg.parallel.resolve(world)
    dims = [f"{k} {getattr(p, k)}" for k in ("dp_replicate", "dp_shard", "tp", "pp") if getattr(p, k) > 1]
    text = " x ".join(dims) or "1 process"
    return text + (f" ({p.pp_schedule})" if p.pp > 1 else "")


def table_rows() -> list[str]:
    """The memory table of docs/parallel.md, one row per shipped recipe (GiB per GPU)."""
    from qwen15.train.config import load_config

    rows = []
    for path in FULL:
        cfg = load_config(path)
        world = cfg.parallel.world_size
        est = recipe_memory(cfg, recipe_model(cfg), world, DATA_SEQ.get(path.stem)).gib()
        seq = cfg.data.seq_length or DATA_SEQ[path.stem]
        ckpt = "yes" if cfg.train.activation_checkpointing else "no"
        cells = [
            path.stem,
            str(world),
            layout_text(cfg, world),
            f"{cfg.train.micro_batch_size} x {seq}",
            ckpt,
        ]
        cells += [
            f"{est[k]:.2f}" for k in ("parameters", "gradients", "optimizer", "activations", "transient")
        ]
        cells.append(f"{est['total']:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_fits_its_gpus(path):
    from qwen15.train.config import load_config

    cfg = load_config(path)
    world = cfg.parallel.world_size
    assert world is not None, f"{path.name}: state the GPUs it is laid out for (parallel.world_size)"
    est = recipe_memory(cfg, recipe_model(cfg), world, DATA_SEQ.get(path.stem))
    assert est.total / GIB + RESERVED_GIB <= GPU_GIB, f"{path.name}: {est.gib()} GiB per GPU"


@pytest.mark.parametrize("doc", ["docs/parallel.md", "README.md"])
def test_docs_table_is_the_memory_model_of_the_shipped_recipes(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = [row for row in table_rows() if row not in text]
    assert not missing, f"{doc} is out of date; rows now:\n" + "\n".join(table_rows())


def test_stored_bytes_exact_and_activations_close_for_the_real_05b_width():
    """Qwen1.5-0.5B's width and 151936-row vocabulary (2 of its 24 layers, to stay small on CPU), one AdamW step
    with the trainer's optimizer: parameters, gradients and optimizer state are exactly the estimate, and the
    tensors autograd keeps for backward are within 5% of it."""
    from test_parallel import activation_bytes

    from qwen15.model import Qwen
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.vocab_parallel_loss import cross_entropy
    from qwen15.train.config import OptimSection
    from qwen15.train.optim import build_optimizer

    cfg = get_preset("qwen1.5-0.5b").replace(num_hidden_layers=2)
    model = Qwen.from_config(cfg, seed=0)
    rows, seq = 1, 64
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
    est = estimate_memory(
        cfg,
        ParallelLayout(dp_shard=1),
        micro_batch_size=rows,
        seq_len=seq,
        param_dtype="fp32",
        compute_dtype="fp32",
    )
    measured_activations = activation_bytes(model, ids, labels)
    optimizer = build_optimizer(model, OptimSection(lr=1e-4))
    cross_entropy(model(ids), labels).backward()
    optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    assert nbytes(model.parameters()) == est.parameters
    assert nbytes(p.grad for p in model.parameters()) == est.gradients
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert nbytes(state) == est.optimizer
    assert measured_activations == pytest.approx(est.activations, rel=0.05)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"parallel__tp": 2}, r"parallel: world size 1 is not divisible by dp_replicate x tp x pp"),
        ({"parallel__dp_shard": 2}, r"parallel: pp x dp_replicate x dp_shard x tp = 1 x 1 x 2 x 1 = 2 ranks"),
        (
            {"parallel__pp": 2, "parallel__dp_shard": 1},
            r"pp x dp_replicate x dp_shard x tp = 2 x 1 x 1 x 1 = 2",
        ),
        ({"parallel__pp_microbatches": 3}, None),  # pp 1: the key is unused
        ({"train__global_batch_size": 6, "train__micro_batch_size": 4}, r"train.global_batch_size 6"),
    ],
)
def test_layout_errors_name_the_key(tmp_path, changes, message):
    from test_train_helpers import config, make_dataset

    from qwen15.errors import UserError
    from qwen15.train.trainer import Trainer

    data = make_dataset(tmp_path / "data", "pad", n_docs=20)
    if message is None:
        Trainer(config(data, tmp_path / "run", **changes), echo=lambda m: None).close()
        return
    with pytest.raises(UserError, match=message):
        Trainer(config(data, tmp_path / "run", **changes), echo=lambda m: None)


def test_layout_errors_against_the_model_name_the_key(tmp_path):
    """Checked with the model shape and the batch (ParallelLayout.validate), on a fake world of 4."""
    from qwen15.parallel.layout import LayoutError, ParallelLayout

    gqa = get_preset("tiny-gqa")  # 4 heads, 2 kv heads, untied
    with pytest.raises(LayoutError, match=r"parallel.tp = 4: num_key_value_heads 2 is not divisible by tp"):
        ParallelLayout(tp=4).validate(4, gqa)
    with pytest.raises(LayoutError, match=r"parallel.pp = 2: this model ties its output layer"):
        ParallelLayout(pp=2).validate(4, get_preset("tiny"))
    with pytest.raises(LayoutError, match=r"parallel.pp_microbatches = 4: the batch per data-parallel rank"):
        ParallelLayout(pp=2, pp_microbatches=4).validate(4, gqa, local_batch_size=6)
    from qwen15.train.config import TrainConfigError, load_config

    with pytest.raises(TrainConfigError, match=r"train.loss_chunk_size works with parallel.pp 1 only"):
        load_config(
            None,
            [
                "--data.path",
                "x",
                "--model.preset",
                "tiny",
                "--parallel.pp",
                "2",
                "--train.loss_chunk_size",
                "64",
            ],
        )
    with pytest.raises(TrainConfigError, match=r"parallel.pp_schedule must be one of 1F1B"):
        load_config(None, ["--data.path", "x", "--model.preset", "tiny", "--parallel.pp_schedule", "zigzag"])
