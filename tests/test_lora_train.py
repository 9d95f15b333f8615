"""`qwen15 train` with a lora section, in one process: the same losses and adapters as the PEFT + transformers +
AdamW oracle (test_lora_helpers.reference_lora_training), only adapters get gradients and optimizer state, the base
stays frozen in its dtype (bf16, or int8), checkpoints hold the adapters only and resume bit for bit, the run's
adapter loads in PEFT with our logits. Tolerances as for full training: losses 1e-5 relative, weights 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
from test_lora_helpers import checkpoint_adapters, hf_copy, lora_overrides, reference_lora_training
from test_train_helpers import config, make_dataset, max_abs_diff

from qwen15.lora import LoRALinear
from qwen15.train.trainer import Trainer, train

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pad_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lora") / "pad", "pad")


def test_one_process_matches_the_peft_oracle(pad_data, tmp_path):
    result = train(config(pad_data, tmp_path / "run", **lora_overrides()), echo=lambda m: None)
    ref_losses, ref_adapters = reference_lora_training(pad_data)
    assert result.losses == pytest.approx(ref_losses, rel=1e-5)
    assert max_abs_diff(checkpoint_adapters(result.last_checkpoint), ref_adapters) < 1e-4
    assert all(v.abs().max() > 1e-4 for k, v in ref_adapters.items() if "lora_B" in k)  # B moved off zero


def test_only_adapters_train_and_the_base_stays_bf16(pad_data, tmp_path):
    """lora.base_dtype bfloat16 (bf16 compute, as on a GPU): frozen base parameters bf16 with no gradient and no
    optimizer state; adapters and both AdamW moments fp32."""
    lines = []
    trainer = Trainer(
        config(
            pad_data, tmp_path / "run", **lora_overrides(lora__base_dtype="bfloat16", train__dtype="bfloat16")
        ),
        echo=lines.append,
    )
    try:
        trainer.train_step(trainer.dataset.batch(trainer.sampler.next_batch()))
        adapters = {n: p for n, p in trainer.model.named_parameters() if ".lora_" in n}
        frozen = {n: p for n, p in trainer.model.named_parameters() if ".lora_" not in n}
        assert adapters and all(p.requires_grad and p.dtype == torch.float32 for p in adapters.values())
        assert all(
            not p.requires_grad and p.grad is None and p.dtype == torch.bfloat16 for p in frozen.values()
        )
        (optimizer,) = trainer.optimizers
        held = {id(p) for p in optimizer.state}
        assert held == {id(p) for p in adapters.values()}
        for state in optimizer.state.values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert any("adapter parameters" in m and "frozen in bfloat16" in m for m in lines), lines
    finally:
        trainer.close()


def test_checkpoints_hold_only_the_adapters_and_resume_bit_for_bit(pad_data, tmp_path):
    """With dropout on (random masks: the restored RNG matters), 2 + 2 steps equal 4 steps exactly; the state
    holds adapter tensors only, 12 bytes per element (weight and two fp32 moments) plus DCP's entries, a small
    part of a full run's (docs/lora.md states the figure for the 0.5B shape, from parallel.memory)."""
    import torch.distributed.checkpoint as dcp

    kw = lora_overrides(lora__dropout=0.1)
    whole = train(config(pad_data, tmp_path / "whole", **kw), echo=lambda m: None)
    first = train(config(pad_data, tmp_path / "split", train__stop_at=2, **kw), echo=lambda m: None)
    second = train(config(pad_data, tmp_path / "split", **kw), echo=lambda m: None)
    assert first.losses + second.losses == whole.losses
    a, b = checkpoint_adapters(whole.last_checkpoint), checkpoint_adapters(second.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)

    keys = dcp.FileSystemReader(str(whole.last_checkpoint / "state")).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys == set(a)
    full = train(config(pad_data, tmp_path / "full", train__stop_at=1), echo=lambda m: None)

    def state_bytes(ckpt):
        return sum(f.stat().st_size for f in (ckpt / "state").iterdir())

    trained = sum(v.numel() for v in a.values())
    # 12 bytes per adapter element, plus about 30 kB of DCP entries per tensor (optimizer settings are saved per parameter).
    assert state_bytes(whole.last_checkpoint) < 12 * trained + 40_000 * len(a)
    assert state_bytes(whole.last_checkpoint) < 0.25 * state_bytes(full.last_checkpoint)


def test_resume_refuses_another_kind_of_checkpoint(pad_data, tmp_path):
    from qwen15.train.config import TrainConfigError

    train(config(pad_data, tmp_path / "full", train__stop_at=1), echo=lambda m: None)
    with pytest.raises(TrainConfigError, match=r"a full-training checkpoint cannot resume a LoRA run"):
        Trainer(
            config(pad_data, tmp_path / "full", train__stop_at=2, **lora_overrides()), echo=lambda m: None
        )
    train(config(pad_data, tmp_path / "lora", train__stop_at=1, **lora_overrides()), echo=lambda m: None)
    with pytest.raises(TrainConfigError, match=r"adapters have lora.r 4, this run 8"):
        Trainer(
            config(pad_data, tmp_path / "lora", train__stop_at=2, **lora_overrides(lora__r=8)),
            echo=lambda m: None,
        )
    with pytest.raises(
        TrainConfigError, match=r"a LoRA checkpoint \(adapters only\) cannot resume full training"
    ):
        Trainer(config(pad_data, tmp_path / "lora", train__stop_at=2), echo=lambda m: None)


def test_finetune_run_exports_an_adapter_peft_loads_with_our_logits(pad_data, tmp_path, capsys):
    """train.mode finetune from a Hugging Face folder: the run's adapter (written at the end) and `qwen15 convert
    --to peft` of its checkpoint are one adapter; PeftModel over the base gives the logits of our base + adapter;
    `convert --to hf` of the LoRA checkpoint says what to do instead."""
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    from qwen15 import Qwen, get_preset, load_adapter
    from qwen15.cli import main

    base = tmp_path / "base"
    hf_copy(Qwen.from_config(get_preset("tiny-gqa").replace(vocab_size=256), seed=5)).save_pretrained(base)
    kw = lora_overrides(
        train__mode="finetune", model__path=str(base), model__preset=None, model__vocab_size=None,
        model__init_seed=0, lora__target_modules="[q_proj, v_proj, down_proj]", lora__rslora=True,
    )  # fmt: skip
    result = train(config(pad_data, tmp_path / "run", **kw), echo=lambda m: None)
    adapter = tmp_path / "run" / "adapter"
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(base) and written["use_rslora"] is True
    assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"] and written["r"] == 4
    assert main(["convert", "--to", "peft", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(Qwen.from_pretrained(base), adapter).eval()
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 3 * 2
    peft = PeftModel.from_pretrained(
        Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    with torch.no_grad():
        expected = peft(ids).logits
        assert (ours(ids) - expected).abs().max() <= 1e-5 * expected.abs().max()
        plain = Qwen.from_pretrained(base).eval()(ids)
        assert (plain - expected).abs().max() > 1e-3  # the adapter changes the outputs
    assert main(["convert", "--to", "hf", str(result.last_checkpoint), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "a LoRA checkpoint holds the adapters only" in err and "--to peft" in err
    assert not (tmp_path / "hf").exists()


def test_int8_base_trains_the_adapters_and_saves_no_base(pad_data, tmp_path):
    """lora.base_dtype int8 (QLoRA-like): the block projections are int8 buffers under the adapters, the loss
    follows the fp32-base run closely, and the checkpoint is the same adapters-only state."""
    import torch.distributed.checkpoint as dcp

    from qwen15.quantize import Int8Linear

    fp32 = train(config(pad_data, tmp_path / "fp32", **lora_overrides()), echo=lambda m: None)
    trainer = Trainer(
        config(pad_data, tmp_path / "int8", **lora_overrides(lora__base_dtype="int8")), echo=lambda m: None
    )
    try:
        q = trainer.model.layers["0"].self_attn.q_proj
        assert isinstance(q, LoRALinear) and isinstance(q.base_layer, Int8Linear)
        assert q.base_layer.weight.dtype == torch.int8
        result = trainer.run()
    finally:
        trainer.close()
    assert result.losses == pytest.approx(fp32.losses, rel=2e-2)
    keys = dcp.FileSystemReader(str(result.last_checkpoint / "state")).read_metadata().state_dict_metadata
    assert all(".lora_" in k for k in keys if k.startswith("model."))


@pytest.mark.slow  # compiling the blocks takes minutes on 2 shared CPU cores
def test_activation_checkpointing_and_compile_give_the_same_run(pad_data, tmp_path):
    plain = train(config(pad_data, tmp_path / "plain", **lora_overrides()), echo=lambda m: None)
    both = train(
        config(
            pad_data,
            tmp_path / "ac",
            train__activation_checkpointing=True,
            train__compile=True,
            **lora_overrides(),
        ),
        echo=lambda m: None,
    )
    assert both.losses == pytest.approx(plain.losses, rel=1e-5)
    assert (
        max_abs_diff(checkpoint_adapters(both.last_checkpoint), checkpoint_adapters(plain.last_checkpoint))
        < 1e-5
    )
