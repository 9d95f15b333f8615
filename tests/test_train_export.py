"""Finetuning from a Hugging Face folder and exporting back: the real tokenizer, real Alpaca conversations (packed,
assistant-only loss), transformers as the oracle for the exported folder."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_helpers import (
    BASE,
    assert_matches_reference,
    checkpoint_weights,
    max_abs_diff,
    reference_training,
)

from conftest import SHARED_DATA, needs_shared, random_hf_model

pytestmark = needs_shared
SEQ = 64
# The real 151936-row vocabulary makes the output layer the cost: keep the batch small (4 rows, 2 steps).
SMALL = {"train.steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 2, "optim.warmup_steps": 1}


def alpaca_dataset(tokenizer_dir, folder, n: int = 24):
    """As a user would: `qwen15 data alpaca-to-chat`, then `qwen15 data preprocess --type chat --layout pack`
    (loss on the assistant replies)."""
    from qwen15.cli import main

    records = json.loads((SHARED_DATA / "alpaca_data_first200.json").read_text())[:n]
    (folder.parent / "alpaca.json").write_text(json.dumps(records))
    chat = folder.parent / "chat.jsonl"
    assert (
        main(["data", "alpaca-to-chat", "--input", str(folder.parent / "alpaca.json"), "--output", str(chat)])
        == 0
    )
    args = ["data", "preprocess", "--type", "chat", "--input", str(chat), "--tokenizer", str(tokenizer_dir)]
    args += ["--seq-length", str(SEQ), "--layout", "pack", "--loss-on", "assistant", "--output", str(folder)]
    assert main([*args, "--quiet"]) == 0
    return folder


def args(**kw) -> list[str]:
    values = dict(BASE, **kw)
    for key in ("model.preset", "model.vocab_size", "model.init_seed"):
        values.pop(key)
    out = []
    for k, v in values.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny-gqa", marks=pytest.mark.slow)])
def test_finetune_from_hf_then_export_loads_in_transformers(tmp_path, tokenizer, preset, capsys):
    transformers = pytest.importorskip("transformers")
    from qwen15 import Qwen, get_preset
    from qwen15.cli import main

    cfg = get_preset(preset)
    hf_dir = tmp_path / "hf"
    random_hf_model(cfg, seed=1).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    data = alpaca_dataset(hf_dir, tmp_path / "data")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *args(
                    **{
                        "train.mode": "finetune",
                        "model.path": hf_dir,
                        "data.path": data,
                        "train.run_dir": run,
                        "optim.lr": 1e-3,
                        **SMALL,
                    }
                ),
            ]
        )
        == 0
    )
    ckpt = run / "checkpoints" / "step-00000002"

    # The same finetune from our own load of the folder, in the plain reference loop.
    ours = Qwen.from_pretrained(hf_dir)
    reference = reference_training(data, model=ours, **{"optim.lr": 1e-3, **SMALL})
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = checkpoint_weights(ckpt)
    assert_matches_reference(losses, trained, reference)

    out = tmp_path / "export"
    assert main(["convert", "--to", "hf", str(run), str(out), "--dtype", "float32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == 151645  # chat data -> a chat model, as Qwen1.5-Chat
    assert generation["eos_token_id"] == [151645, 151643] and generation["top_p"] == 0.8
    assert ("lm_head.weight" in json.dumps(_tensor_names(out))) != cfg.tie_word_embeddings

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mine = Qwen(cfg)
    mine.load_state_dict(trained)
    mine.tie_weights()
    ids = torch.randint(0, 151643, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(ids).logits, mine.eval()(ids)
    assert (expected - got).abs().max().item() < 1e-4
    assert (Qwen.from_pretrained(out)(ids) - got).abs().max().item() == 0  # our own loader agrees exactly
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world, <|im_start|>user\nWhat is 2+2?<|im_end|>"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)


def _tensor_names(folder):
    from qwen15.hf_folder import read_safetensors_header

    names = []
    for f in folder.glob("*.safetensors"):
        names += list(read_safetensors_header(f))
    return names


def test_convert_refuses_incomplete_checkpoints_and_existing_output(tmp_path, capsys):
    from test_train_helpers import config, make_dataset

    from qwen15.cli import main
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pad")
    result = train(
        config(data, tmp_path / "run", **{"train.steps": 1, "optim.warmup_steps": 0}), echo=lambda m: None
    )
    partial = tmp_path / "run" / "checkpoints" / "step-00000009"
    partial.mkdir()
    assert main(["convert", "--to", "hf", str(partial), str(tmp_path / "out")]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", "--to", "hf", str(result.last_checkpoint), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    convert = [
        "convert",
        "--to",
        "hf",
        str(tmp_path / "run"),
        str(tmp_path / "out"),
        "--max-shard-size",
        "100KB",
    ]
    # --overwrite replaces only a folder qwen15 wrote: the user's keep.txt stays
    assert main([*convert, "--overwrite"]) == 2
    assert "not written by qwen15" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "out" / "keep.txt").unlink()
    assert main(convert) == 0  # an empty folder is taken
    assert main(convert) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*convert, "--overwrite"]) == 0  # our own export is replaced
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, one shard in memory at a time
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from qwen15 import Qwen

    exported = Qwen.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    trained = checkpoint_weights(result.last_checkpoint)
    assert max_abs_diff(exported, {k: v.to(torch.bfloat16) for k, v in trained.items()}) == 0
