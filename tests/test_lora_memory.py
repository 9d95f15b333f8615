"""The LoRA memory model (qwen15.parallel.memory.estimate_lora_memory) against what a process holds: stored bytes of
the frozen base (bf16, or int8 projections), adapters, gradients and AdamW state exactly for the real 0.5B width;
activations (autograd's saved tensors) within 5%; the recipes' table in docs/lora.md and the README is the model's
output for the shipped lora_*.yaml (that each fits its GPUs is checked with every recipe in
test_parallel_recipes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_parallel import activation_bytes, model_for

from qwen15.lora import TARGETS, LoRASpec, add_adapters
from qwen15.model import Qwen
from qwen15.model_config import get_preset
from qwen15.parallel.layout import ParallelLayout
from qwen15.parallel.memory import GIB, adapter_shapes, estimate_lora_memory, recipe_memory

ROOT = Path(__file__).resolve().parents[1]
LORA_RECIPES = sorted((ROOT / "configs").glob("lora_*.yaml"))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@pytest.mark.parametrize("targets", [TARGETS, ("q_proj", "v_proj")])
def test_adapter_shapes_match_the_model(targets):
    cfg = get_preset("tiny-gqa")
    spec = LoRASpec(8, 16, target_modules=targets)
    with torch.device("meta"):
        model = Qwen(cfg)
    add_adapters(model, spec, init=False)
    got = {n: tuple(p.shape) for n, p in model.named_parameters() if ".lora_" in n}
    assert got == {n: s for n, (s, _) in adapter_shapes(cfg, spec).items()}


@pytest.mark.parametrize("targets", [TARGETS, ("q_proj", "v_proj")], ids=["all", "q-v"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_activation_estimate_matches_saved_tensors(preset, dtype, dropout, targets):
    """In training mode, so that dropout runs (measured within 0.3% here)."""
    cfg = get_preset(preset).replace(vocab_size=1024)
    model = model_for(cfg)
    spec = LoRASpec(8, 16, dropout=dropout, target_modules=targets)
    add_adapters(model, spec, generator=torch.Generator().manual_seed(0))
    model = model.to(getattr(torch, dtype)).train()
    rows, seq = 2, 96
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen)
    est = estimate_lora_memory(
        cfg, ParallelLayout(dp_shard=1), spec, micro_batch_size=rows, seq_len=seq, base_dtype=dtype,
        compute_dtype=dtype, mask_bytes=model.layers["0"].mlp.up_proj.weight.element_size(),  # CPU: float masks
    )  # fmt: skip
    assert activation_bytes(model, ids, labels) == pytest.approx(est.activations, rel=0.05)


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_stored_bytes_exact_for_the_real_05b_width(base_dtype):
    """Qwen1.5-0.5B's width and vocabulary (2 of its 24 layers), rank-16 adapters everywhere, one AdamW step of
    the trainer's optimizer under bf16 autocast: the base in bf16 (or int8 projections with bf16 scales),
    adapters and their gradients and moments in fp32, each exactly the estimate."""
    from qwen15.parallel.vocab_parallel_loss import cross_entropy
    from qwen15.quantize import quantize_int8
    from qwen15.train.config import OptimSection
    from qwen15.train.optim import build_optimizer

    cfg = get_preset("qwen1.5-0.5b").replace(num_hidden_layers=2)
    spec = LoRASpec(16, 32)
    with torch.device("meta"):
        model = Qwen(cfg)
    add_adapters(model, spec, init=False)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if base_dtype == "int8":
        quantize_int8(model, embeddings=False)
    est = estimate_lora_memory(
        cfg, ParallelLayout(dp_shard=1), spec, micro_batch_size=1, seq_len=32, base_dtype=base_dtype
    )
    assert nbytes([*model.parameters(), *model.buffers()]) == est.parameters
    optimizer = build_optimizer(model, OptimSection(lr=1e-4))
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        loss = cross_entropy(model(ids), ids)
    loss.backward()
    optimizer.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert nbytes(grads) == est.gradients and all(g.dtype == torch.float32 for g in grads)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert nbytes(state) == est.optimizer


def lora_table_rows() -> list[str]:
    """The LoRA recipes' memory table (GiB per GPU), one row per configs/lora_*.yaml."""
    from test_parallel_recipes import layout_text, recipe_model

    from qwen15.train.config import load_config

    rows = []
    for path in LORA_RECIPES:
        cfg = load_config(path)
        world = cfg.parallel.world_size
        est = recipe_memory(cfg, recipe_model(cfg), world).gib()
        base = "bfloat16" if cfg.lora.base_dtype == "auto" else cfg.lora.base_dtype
        cells = [
            path.stem,
            str(world),
            layout_text(cfg, world),
            base,
            f"{cfg.lora.r} / {len(cfg.lora.target_modules)}",
            f"{cfg.train.micro_batch_size} x {cfg.data.seq_length}",
            "yes" if cfg.train.activation_checkpointing else "no",
        ]
        cells += [
            f"{est[k]:.2f}" for k in ("parameters", "gradients", "optimizer", "activations", "transient")
        ]
        cells.append(f"{est['total']:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


@pytest.mark.parametrize("doc", ["docs/lora.md", "README.md"])
def test_docs_table_is_the_memory_model_of_the_lora_recipes(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    rows = lora_table_rows()
    assert len(rows) == 4
    missing = [row for row in rows if row not in text]
    assert not missing, f"{doc} is out of date; rows now:\n" + "\n".join(rows)


def test_docs_state_the_checkpoint_and_int8_figures_of_the_model():
    """docs/lora.md's figures: the 0.5B LoRA checkpoint against a full one (adapters and their AdamW moments vs
    every weight and its moments, 12 bytes per element either way), and 7B's parameters with an int8 base."""
    from qwen15.parallel.memory import param_shapes

    cfg = get_preset("qwen1.5-0.5b")
    spec = LoRASpec(16, 32)
    adapters = sum(torch.Size(s).numel() for s, _ in adapter_shapes(cfg, spec).values())
    full = sum(torch.Size(s).numel() for s, _ in param_shapes(cfg).values())
    text = (ROOT / "docs" / "lora.md").read_text(encoding="utf-8")
    sentence = (
        f"{adapters / 1e6:.2f}M adapter elements against {full / 1e6:.0f}M weights: "
        f"{12 * adapters / 1e6:.0f} MB of adapters and AdamW moments against {12 * full / 1e9:.1f} GB "
        f"({100 * adapters / full:.1f}%)"
    )
    assert sentence in text, sentence
    kw = dict(micro_batch_size=1, seq_len=4096, world_size=1)
    seven = get_preset("qwen1.5-7b")
    bf16 = estimate_lora_memory(seven, ParallelLayout(), spec, base_dtype="bfloat16", **kw).parameters / GIB
    int8 = estimate_lora_memory(seven, ParallelLayout(), spec, base_dtype="int8", **kw).parameters / GIB
    assert f"{bf16:.1f} GiB of parameters in bf16, {int8:.1f} GiB with an int8 base" in text
