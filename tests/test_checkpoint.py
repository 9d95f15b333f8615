"""Hugging Face checkpoints in and out, checked with transformers on both sides."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen15 import Qwen
from qwen15.errors import UserError
from qwen15.hf_folder import CheckpointError
from qwen15.model_config import ConfigError, get_preset

from conftest import random_hf_model

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))


def small(name):
    return get_preset(name).replace(vocab_size=512)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "tiny-gqa"])
def test_transformers_saves_we_load(tmp_path, name):
    cfg = small(name)
    hf = random_hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")  # sharded with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Qwen.from_pretrained(tmp_path)
    with torch.no_grad():
        assert max_diff(hf(IDS).logits, ours(IDS)) <= 1e-5
    assert ours.config == cfg.replace(torch_dtype="float32", bos_token_id=151643, eos_token_id=151643)


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "tiny-gqa"])
def test_we_save_transformers_loads(tmp_path, name, tokenizer):
    ours = Qwen.from_config(small(name), seed=2).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 1.5)  # biases and norms non-trivial
    ours.save_pretrained(tmp_path, tokenizer=tokenizer, max_shard_size="300KB")
    files = set(os.listdir(tmp_path))
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    } <= files
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(hf(IDS).logits, ours(IDS)) <= 1e-5
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert ("lm_head.weight" in names) != ours.config.tie_word_embeddings
    assert "model.layers.0.self_attn.q_proj.bias" in names
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode("Hello world") == [9707, 1879]


def test_chat_model_exports_both_stop_ids(tmp_path):
    cfg = small("tiny").replace(eos_token_id=151645)
    Qwen.from_config(cfg, seed=0).save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    hf_gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert hf_gen.eos_token_id == [151645, 151643]


def test_generation_config_round_trips(tmp_path):
    cfg = small("tiny")
    model = Qwen.from_config(cfg, seed=0)
    model.save_pretrained(tmp_path / "a", generation_config={"eos_token_id": [151645, 151643], "top_p": 0.7})
    loaded = Qwen.from_pretrained(tmp_path / "a")
    assert loaded.generation_config["top_p"] == 0.7
    loaded.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text())["top_p"] == 0.7


def test_tied_lm_head_present_as_redundant_copy_loads(tmp_path):
    cfg = small("tiny")
    hf = random_hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = Qwen.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    with torch.no_grad():
        assert max_diff(hf(IDS).logits, ours(IDS)) <= 1e-5


def test_bf16_load(tmp_path):
    cfg = small("tiny-gqa")
    hf = random_hf_model(cfg, seed=4).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = Qwen.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.layers["0"].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert max_diff(hf(IDS).logits.float(), ours(IDS).float()) <= 1e-2
    fp32 = Qwen.from_pretrained(tmp_path)  # CPU default: fp32, upcast from the bf16 file
    assert fp32.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(fp32.embed_tokens.weight, ours.embed_tokens.weight.float())


def test_pytorch_bin_checkpoint_is_refused_with_how_to_convert(tmp_path):
    """Pickled weights are never loaded (a .bin can run code); the message says how to get safetensors."""
    cfg = small("tiny-mha")
    random_hf_model(cfg, seed=5).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin .*never unpickles.*save_pretrained"):
        Qwen.from_pretrained(tmp_path)


def _hf_folder(tmp_path, name="tiny-mha"):
    cfg = small(name)
    random_hf_model(cfg, seed=6).save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    state = _hf_folder(tmp_path)
    del state["model.layers.1.self_attn.v_proj.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.v_proj\.bias"):
        Qwen.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    state = _hf_folder(tmp_path)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(10, 256)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"wrong shapes: model\.layers\.0\.mlp\.up_proj\.weight: checkpoint "
        r"\[10, 256\], model \[512, 256\]",
    ):
        Qwen.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    state = _hf_folder(tmp_path)
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(512, 256)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.2\.mlp\.up_proj\.weight"):
        Qwen.from_pretrained(tmp_path)


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    state = _hf_folder(tmp_path, "tiny-gqa")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: lm_head\.weight"):
        Qwen.from_pretrained(tmp_path)


def test_malformed_config_is_refused(tmp_path):
    _hf_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 256,, }')
    with pytest.raises(ConfigError, match=r"config\.json:1:\d+: malformed JSON"):
        Qwen.from_pretrained(tmp_path)


def test_truncated_shard_is_refused(tmp_path):
    _hf_folder(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        Qwen.from_pretrained(tmp_path)


def test_hub_name_says_how_to_download(tmp_path):
    with pytest.raises(UserError, match="hf download Qwen/Qwen1.5-7B-Chat --local-dir"):
        Qwen.from_pretrained("Qwen/Qwen1.5-7B-Chat")
    with pytest.raises(UserError, match="no such model folder"):
        Qwen.from_pretrained("/nonexistent/folder")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is a file, not a model folder"):
        Qwen.from_pretrained(tmp_path / "config.json")


def test_save_is_atomic_and_keeps_the_old_folder_on_failure(tmp_path, monkeypatch):
    model = Qwen.from_config(small("tiny"), seed=0)
    model.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    import qwen15.hf_folder as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.ModelConfig, "save_json", boom)
    with pytest.raises(OSError, match="disk full"):
        Qwen.from_config(small("tiny"), seed=1).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left behind


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from qwen15 import Qwen
    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    torch.ones(1)  # initialise torch's allocator before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM); ru_maxrss would carry the parent's peak across fork + exec
    base = status_mb("VmRSS")
    model = Qwen.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    peak = status_mb("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"{base:.1f} {peak:.1f} {weights:.1f}")
""")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_memory_while_loading_stays_near_weight_size(tmp_path, dtype):
    """Peak resident memory added by loading stays <= 1.3x the loaded weights (meta-device build + mmap copy)."""
    cfg = get_preset("qwen1.5-0.5b").replace(num_hidden_layers=6)
    Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16).save_pretrained(tmp_path, max_shard_size="200MB")
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), dtype],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    base, peak, weights = map(float, out)
    assert (peak - base) <= 1.3 * weights, f"baseline {base} MB, peak {peak} MB, weights {weights} MB"
