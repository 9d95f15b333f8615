"""Every `qwen15` command in docs/migrate.md runs, on the MindSpore fixtures laid out under the names it uses."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from qwen15.cli import main

from conftest import SHARED_TOKENIZER, needs_shared

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "mindspore"
GQA = json.loads((FIX / "shapes.json").read_text())["gqa"]
YAML = f"""model:
  model_config:
    type: LlamaConfig
    hidden_size: {GQA["hidden"]}
    num_layers: {GQA["layers"]}
    num_heads: {GQA["heads"]}
    n_kv_heads: {GQA["kv_heads"]}
    intermediate_size: {GQA["inter"]}
    vocab_size: {GQA["vocab"]}
    rms_norm_eps: 1.0e-6
    theta: 1000000.0
    qkv_has_bias: True
"""


def doc_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "migrate.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [
        shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith("qwen15 ")
    ]


@needs_shared
def test_migrate_doc_commands_run(tmp_path, monkeypatch):
    shutil.copy(FIX / "train_bf16_crc.ckpt", tmp_path / "qwen1_5_7b.ckpt")
    for name in ("predict_qwen1_5_7b.yaml", "finetune_qwen1_5_7b.yaml"):
        (tmp_path / name).write_text(YAML)
    shutil.copytree(SHARED_TOKENIZER, tmp_path / "tokenizer")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED_TOKENIZER / f, tmp_path / f)
    shutil.copytree(FIX / "sharded", tmp_path / "output")
    lora_stand_ins(tmp_path)
    for f in FIX.glob("*.mindrecord*"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    commands = doc_commands()
    assert len(commands) >= 6
    for argv in commands:
        assert argv[0] == "qwen15"
        quiet = ["--device", "cpu"] if argv[1] == "generate" else ["--quiet"]  # generate prints no progress
        assert main([*argv[1:], *quiet]) == 0, argv
    assert (tmp_path / "Qwen1.5-7B-hf" / "model.safetensors").is_file()
    assert (tmp_path / "Qwen1.5-7B-hf" / "vocab.json").is_file()
    assert (tmp_path / "data" / "alpaca" / "meta.json").is_file()
    assert (tmp_path / "Qwen1.5-7B-lora" / "adapter_model.safetensors").is_file()


def lora_stand_ins(tmp_path: Path) -> None:
    """A LoRA run's checkpoint (base weights + the LoRA fixture), its YAML and a tokenizer that fits: the base's
    vocabulary padded to a small BPE tokenizer's, so that `generate --adapter` runs on it."""
    import numpy as np

    from qwen15.demo.bpe import train_bpe
    from qwen15.mindspore.ckpt import CkptFile, CkptWriter

    tok = train_bpe(["MindFormers LoRA weights in a PEFT adapter folder."] * 10, 260)
    tok.save_pretrained(tmp_path / "qwen1_5_tokenizer")
    with CkptWriter(tmp_path / "qwen1_5_7b_lora.ckpt") as w:
        for f in ("sliced_fp32.ckpt", "lora_fp32.ckpt"):
            src = CkptFile(FIX / f)
            for t in src.tensors.values():
                value = t.read()
                if t.name in ("model.tok_embeddings.embedding_weight", "lm_head.weight"):
                    value = np.concatenate(
                        [value, np.zeros((len(tok) - len(value), value.shape[1]), value.dtype)]
                    )
                w.add(t.name, t.dtype, value.shape, [value])
            src.close()
    pet = "\n".join(
        ["    pet_config:", "      pet_type: lora", "      lora_rank: 2", "      lora_alpha: 3",
         "      target_modules: '.*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3'"]
    )  # fmt: skip
    yaml = YAML.replace(f"vocab_size: {GQA['vocab']}", f"vocab_size: {len(tok)}") + pet + "\n"
    (tmp_path / "finetune_qwen1_5_7b_lora.yaml").write_text(yaml)
