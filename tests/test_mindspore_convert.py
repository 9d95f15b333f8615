"""MindFormers checkpoints <-> Hugging Face folders: the fixtures MindSpore wrote (fused layouts made by MindFormers'
own qkv_concat_hf2mg / ffn_concat_hf2mg, per-rank files cut by mindspore.transform_checkpoints) convert to the
original tensors, and a random transformers Qwen2 survives HF -> .ckpt -> HF with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen15.cli import main
from qwen15.mindspore.ckpt import CkptFile, CkptWriter
from qwen15.mindspore.convert import mindspore_to_hf
from qwen15.mindspore.mindformers_config import load_model_config
from qwen15.mindspore.plan import MigrationError
from qwen15.mindspore.strategy import StrategyError
from qwen15.model_config import ModelConfig

from conftest import random_hf_model

FIX = Path(__file__).parent / "fixtures" / "mindspore"
META = json.loads((FIX / "expected.json").read_text())
ARRAYS = np.load(FIX / "expected.npz")
SHAPES = json.loads((FIX / "shapes.json").read_text())


def fixture_config(kind: str) -> ModelConfig:
    s = SHAPES[kind]
    return ModelConfig(
        hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
        tie_word_embeddings=s["tied"],
    )  # fmt: skip


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


CASES = [  # fixture, shapes, expected HF tensors, --qkv-layout
    ("tied_fp16.ckpt", "mha_tied", "tied_fp16", None),
    ("tied_fp16.safetensors", "mha_tied", "tied_fp16", None),
    ("train_bf16_crc.ckpt", "gqa", "train_bf16_crc", None),
    ("fused_concat_fp32.ckpt", "gqa", "gqa_fp32", "concat"),
    ("fused_interleaved_bf16.ckpt", "gqa", "gqa_bf16", "interleaved"),
    ("sliced_fp32.ckpt", "gqa", "gqa_fp32", None),
    ("sliced_fp16_crc.ckpt", "mha_tied", "tied_fp16", None),
    ("sharded/checkpoint", "gqa", "gqa_fp16", None),
    ("sharded_opt/checkpoint", "gqa", "gqa_fp16", None),
    ("sharded_pp/checkpoint", "gqa", "gqa_fp16", None),
    ("sharded_json/checkpoint", "gqa", "gqa_fp16", None),
]


@pytest.mark.parametrize(("rel", "shapes", "label", "layout"), CASES)
def test_fixture_converts_to_the_original_tensors(tmp_path, rel, shapes, label, layout):
    summary = mindspore_to_hf(
        FIX / rel, tmp_path / "hf", fixture_config(shapes), qkv_layout=layout, quiet=True
    )
    got = load_file(tmp_path / "hf" / "model.safetensors")
    expected = META["hf"][label]
    assert set(got) == set(expected)
    for name, e in expected.items():
        assert raw(got[name]) == ARRAYS[e["key"]].tobytes(), name
    assert summary.mapped == len(expected)
    assert summary.fused == (16 if layout else 0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == summary.dtype and config["tie_word_embeddings"] == SHAPES[shapes]["tied"]


def test_training_checkpoint_reports_what_it_skips(tmp_path):
    s = mindspore_to_hf(FIX / "train_bf16_crc.ckpt", tmp_path / "hf", fixture_config("gqa"), quiet=True)
    assert len(s.skipped["optimizer-state tensors"]) == 6
    assert s.scalars == {
        "global_step": 7,
        "step_num": 7,
        "learning_rate": pytest.approx(1e-6),
        "epoch_num": 1,
    }
    text = "\n".join(s.lines())
    assert "skipped 6 optimizer-state tensors: adam_m.model.tok_embeddings.embedding_weight" in text


def test_fused_layout_must_be_named_when_ambiguous(tmp_path):
    with pytest.raises(MigrationError, match=r"row order cannot be read .*--qkv-layout concat .*interleaved"):
        mindspore_to_hf(FIX / "fused_concat_fp32.ckpt", tmp_path / "hf", fixture_config("gqa"), quiet=True)
    assert not (tmp_path / "hf").exists()


def test_wrong_layout_gives_other_tensors(tmp_path):
    """The two orders really differ (so a test passing with the right one means something)."""
    mindspore_to_hf(FIX / "fused_interleaved_bf16.ckpt", tmp_path / "hf", fixture_config("gqa"), qkv_layout="concat",
                    quiet=True)  # fmt: skip
    got = load_file(tmp_path / "hf" / "model.safetensors")
    key = META["hf"]["gqa_bf16"]["model.layers.0.self_attn.q_proj.weight"]["key"]
    assert raw(got["model.layers.0.self_attn.q_proj.weight"]) != ARRAYS[key].tobytes()


def test_shapes_that_do_not_fit_name_tensor_and_both_shapes(tmp_path):
    cfg = fixture_config("gqa").replace(intermediate_size=40)
    with pytest.raises(
        MigrationError, match=r"feed_forward\.w1\.weight: checkpoint \[48, 32\], config \[40, 32\]"
    ):
        mindspore_to_hf(FIX / "sliced_fp32.ckpt", tmp_path / "hf", cfg, quiet=True)
    with pytest.raises(MigrationError, match=r"missing: lm_head.weight .*tie_word_embeddings"):
        mindspore_to_hf(FIX / "tied_fp16.ckpt", tmp_path / "hf", fixture_config("mha_tied").replace(
            tie_word_embeddings=False), quiet=True)  # fmt: skip
    assert not (tmp_path / "hf").exists()


def test_unknown_and_lora_tensors_are_not_dropped_silently(tmp_path):
    src = CkptFile(FIX / "tied_fp16.ckpt")

    def rewrite(path, extra):
        with CkptWriter(path) as w:
            for t in src.tensors.values():
                w.add(t.name, t.dtype, t.shape, [t.read()])
            w.add(extra, "float16", (2, 32), [np.zeros((2, 32), np.float16)])

    rewrite(tmp_path / "odd.ckpt", "model.vision.proj.weight")
    with pytest.raises(MigrationError, match="not MindFormers Qwen1.5 weights: model.vision.proj.weight"):
        mindspore_to_hf(tmp_path / "odd.ckpt", tmp_path / "hf", fixture_config("mha_tied"), quiet=True)
    lora = "model.layers.0.attention.wq.mindpet_delta_lora_a"
    rewrite(tmp_path / "lora.ckpt", lora)
    with pytest.raises(MigrationError, match="LoRA tensors .*--skip-lora"):
        mindspore_to_hf(tmp_path / "lora.ckpt", tmp_path / "hf", fixture_config("mha_tied"), quiet=True)
    s = mindspore_to_hf(tmp_path / "lora.ckpt", tmp_path / "hf", fixture_config("mha_tied"), skip_lora=True,
                        quiet=True)  # fmt: skip
    assert s.skipped["LoRA tensors (--skip-lora)"] == [lora]
    src.close()


def test_sharded_folder_without_strategy_says_what_is_missing(tmp_path):
    import shutil

    shutil.copytree(FIX / "sharded" / "checkpoint", tmp_path / "checkpoint")
    with pytest.raises(StrategyError, match=r"no strategy file was found in .*--strategy"):
        mindspore_to_hf(tmp_path / "checkpoint", tmp_path / "hf", fixture_config("gqa"), quiet=True)
    shutil.rmtree(tmp_path / "checkpoint" / "rank_1")
    with pytest.raises(StrategyError, match=r"split over ranks 0\.\.1 .*rank_1 are missing"):
        mindspore_to_hf(tmp_path / "checkpoint", tmp_path / "hf", fixture_config("gqa"),
                        strategy=FIX / "sharded" / "strategy", quiet=True)  # fmt: skip
    assert not (tmp_path / "hf").exists()


def test_mindformers_yaml_gives_the_shapes(tmp_path):
    yaml_text = """
model:
  model_config:
    type: LlamaConfig
    seq_length: 8192
    hidden_size: 1024
    num_layers: 24
    num_heads: 16
    n_kv_heads: 16
    vocab_size: 151936
    intermediate_size: 2816
    max_position_embeddings: 32768
    qkv_has_bias: True
    rms_norm_eps: 1.0e-6
    theta: 1000000.0
    eos_token_id: [151643,151645]
    tie_word_embeddings: True
  arch:
    type: LlamaForCausalLM
"""
    (tmp_path / "predict_qwen1_5_0_5b_chat.yaml").write_text(yaml_text)
    cfg, section = load_model_config(tmp_path / "predict_qwen1_5_0_5b_chat.yaml")
    from qwen15.model_config import get_preset

    preset = get_preset("qwen1.5-0.5b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (
        preset.hidden_size, preset.num_hidden_layers, preset.intermediate_size, preset.vocab_size)  # fmt: skip
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6 and cfg.eos_token_ids == [151643, 151645]
    assert section["qkv_has_bias"] is True
    (tmp_path / "bad.yaml").write_text("model:\n  model_config:\n    hidden_size: 64\n")
    with pytest.raises(Exception, match=r"bad\.yaml: model\.model_config lacks intermediate_size"):
        load_model_config(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------- end to end, via the CLI

GQA = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)  # fmt: skip
TIED = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=256, tie_word_embeddings=True)  # fmt: skip
IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def cli(*args) -> int:
    return main(["convert", *map(str, args), "--quiet"])


@pytest.mark.parametrize(
    ("cfg", "layout"),
    [(GQA, None), (GQA, "interleaved"), (GQA, "concat"), (TIED, None)],
    ids=["gqa", "gqa-interleaved", "gqa-concat", "tied"],
)
def test_hf_to_mindspore_and_back_keeps_the_logits(tmp_path, cfg, layout):
    transformers = pytest.importorskip("transformers")
    hf = random_hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    fused = ["--qkv-layout", layout] if layout else []
    assert cli("--to", "mindspore", tmp_path / "hf", tmp_path / "m.ckpt", "--crc", *fused) == 0
    with CkptFile(tmp_path / "m.ckpt") as f:
        names = set(f.tensors)
        assert f.has_crc
    assert ("model.layers.0.attention.w_qkv.weight" in names) == bool(layout)
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)
    assert "model.tok_embeddings.embedding_weight" in names
    assert cli("--from", "mindspore", tmp_path / "m.ckpt", tmp_path / "back", "--config", tmp_path / "hf" / "config.json",
               *fused) == 0  # fmt: skip
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, back(IDS).logits)


def test_fp16_round_trip_is_fp16_rounding(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = random_hf_model(GQA, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    assert cli("--to", "mindspore", tmp_path / "hf", tmp_path / "m.ckpt", "--dtype", "float16") == 0
    assert (
        cli(
            "--from",
            "mindspore",
            tmp_path / "m.ckpt",
            tmp_path / "back",
            "--config",
            tmp_path / "hf" / "config.json",
        )
        == 0
    )
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "float16"
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p.half().float()), name  # exactly the fp16 rounding
    rounded = random_hf_model(GQA, seed=4)  # .half() would also round the rotary inv_freq buffer
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
        assert torch.equal(back(IDS).logits, rounded(IDS).logits)
        assert (back(IDS).logits - hf(IDS).logits).abs().max() < 5e-2


def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((FIX / "tied_fp16.ckpt").read_bytes()[:5000])
    assert cli("--from", "mindspore", bad, tmp_path / "out", "--config", tmp_path / "none.yaml") == 2
    assert "none.yaml: no such file" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(fixture_config("mha_tied").to_hf_dict()))
    assert cli("--from", "mindspore", bad, tmp_path / "out", "--config", tmp_path / "config.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen15 convert: error: ") and "bad.ckpt: tensor" in err and "truncated" in err
    assert cli("--from", "mindspore", bad, tmp_path / "out") == 2
    assert "--from mindspore needs the model shapes" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "config.json"]


def test_options_of_the_other_direction_are_refused(tmp_path, capsys):
    assert cli("--to", "mindspore", tmp_path, tmp_path / "x.ckpt", "--config", "c.yaml") == 2
    assert "--config applies to --from mindspore only" in capsys.readouterr().err
    assert cli("--from", "mindspore", tmp_path, tmp_path / "hf", "--crc") == 2
    assert "--crc applies to --to mindspore only" in capsys.readouterr().err
    assert cli("--to", "mindspore", tmp_path, tmp_path / "x.ckpt", "--chat") == 2
    assert cli(tmp_path, tmp_path / "hf", "--strategy", "s") == 2


def test_the_input_is_never_replaced(tmp_path):
    import shutil

    shutil.copytree(FIX / "sharded" / "checkpoint", tmp_path / "ckpt")
    from qwen15.atomic import OutputError

    with pytest.raises(OutputError, match="holds this command's input"):
        mindspore_to_hf(
            tmp_path / "ckpt" / "rank_0", tmp_path / "ckpt", fixture_config("gqa"), overwrite=True
        )
    assert (tmp_path / "ckpt" / "rank_0" / "qwen_rank_0.ckpt").is_file()


def test_chat_flag_sets_the_stop_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(fixture_config("mha_tied").to_hf_dict()))
    assert cli("--from", "mindspore", FIX / "tied_fp16.ckpt", tmp_path / "hf", "--config", tmp_path / "config.json",
               "--chat") == 0  # fmt: skip
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["do_sample"] is True
