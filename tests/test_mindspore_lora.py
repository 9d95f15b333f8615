"""MindFormers LoRA weights -> PEFT adapter: the fixtures MindSpore wrote (names from MindFormers' own LoraAdapter
and mindpet's LoRADense; fused B rows made by MindFormers' qkv_concat_hf2mg / ffn_concat_hf2mg) become adapters
that PEFT applies with the logits of the merged weights W + (lora_alpha / lora_rank) B A, computed in numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen15.cli import main
from qwen15.mindspore.ckpt import CkptFile, CkptWriter

from conftest import hf_config

FIX = Path(__file__).parent / "fixtures" / "mindspore"
META = json.loads((FIX / "expected.json").read_text())
ARRAYS = np.load(FIX / "expected.npz")
GQA = json.loads((FIX / "shapes.json").read_text())["gqa"]
LORA = META["lora"]
PEFT_PREFIX = "base_model.model."
MF = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo"}
MF |= {"gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}


def yaml_text(pet: str | None = None, **overrides) -> str:
    """A MindFormers YAML with the fixtures' shapes and (unless `pet` is "") the fixture's pet_config."""
    lines = [
        "model:",
        "  model_config:",
        "    type: LlamaConfig",
        f"    hidden_size: {GQA['hidden']}",
        f"    num_layers: {GQA['layers']}",
        f"    num_heads: {GQA['heads']}",
        f"    n_kv_heads: {GQA['kv_heads']}",
        f"    intermediate_size: {GQA['inter']}",
        f"    vocab_size: {GQA['vocab']}",
        "    rms_norm_eps: 1.0e-6",
        "    theta: 1000000.0",
    ]
    if pet != "":
        values = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 3, "lora_dropout": 0.05}
        values["target_modules"] = pet or LORA["lora_fp32"]["target_modules"]
        values |= overrides
        lines += ["    pet_config:", *(f"      {k}: {json.dumps(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def convert(tmp_path, fixture: str, *extra: str, yaml: str | None = None) -> int:
    config = tmp_path / "lora.yaml"
    config.write_text(yaml or yaml_text(LORA.get(fixture, LORA["lora_fp32"])["target_modules"]))
    ckpt = fixture if "/" in fixture else str(FIX / f"{fixture}.ckpt")
    argv = ["convert", "--from", "mindspore", ckpt, str(tmp_path / "adapter"), "--to", "peft"]
    return main([*argv, "--config", str(config), *extra])


def layout_args(label: str) -> list[str]:
    return ["--qkv-layout", LORA[label]["layout"]] if LORA[label]["layout"] else []


def base_state() -> dict[str, torch.Tensor]:
    """The fixtures' gqa base weights as MindSpore rounded them (float32: exact)."""
    return {k: torch.from_numpy(ARRAYS[e["key"]].copy()) for k, e in META["hf"]["gqa_fp32"].items()}


def transformers_model(state: dict[str, torch.Tensor], dtype=torch.float64):
    from transformers import Qwen2ForCausalLM

    from qwen15.model_config import ModelConfig

    cfg = ModelConfig(
        hidden_size=GQA["hidden"], intermediate_size=GQA["inter"], num_hidden_layers=GQA["layers"],
        num_attention_heads=GQA["heads"], num_key_value_heads=GQA["kv_heads"],
        vocab_size=state["model.embed_tokens.weight"].shape[0], tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(hf_config(cfg)).eval().to(dtype)
    model.load_state_dict(state, strict=True)
    return model


def merged_state(label: str) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B @ A in numpy: unfused from MindSpore's own load_checkpoint view of the file; fused from
    the per-projection A and B the fixture fused (MindFormers' functions made the fused B from them)."""
    scaling = LORA[label]["alpha"] / LORA[label]["rank"]
    ckpt = META["checkpoints"][f"{label}.ckpt"]
    truth = {k: ARRAYS[e["key"]] for k, e in META["hf"][label].items()}
    state = {k: v.numpy().astype(np.float64) for k, v in base_state().items()}
    for key, a in truth.items():
        if ".lora_A." not in key:
            continue
        module = key.removesuffix(".lora_A.weight")
        b = truth[f"{module}.lora_B.weight"]
        if LORA[label]["layout"] is None:  # straight from MindSpore's tensors
            n, proj = module.split(".")[2], module.rsplit(".", 1)[1]
            mf = f"model.layers.{n}.{MF[proj]}.mindpet_delta_lora_"
            a, b = ARRAYS[ckpt[mf + "a"]["key"]], ARRAYS[ckpt[mf + "b"]["key"]]
        state[f"{module}.weight"] += scaling * (b.astype(np.float64) @ a.astype(np.float64))
    return {k: torch.from_numpy(v) for k, v in state.items()}


IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 41, 8, 3, 22, 50]])


@pytest.mark.parametrize("label", list(LORA))
def test_peft_applies_the_adapter_with_the_merged_weights_logits(tmp_path, capsys, label):
    from peft import PeftModel

    torch.manual_seed(0)
    assert convert(tmp_path, label, *layout_args(label)) == 0
    out = capsys.readouterr().out
    assert "scaling 1.5" in out and "r 2" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 3, 0.05)
    expected = META["hf"][label]
    assert set(config["target_modules"]) == {k.split(".")[4] for k in expected}
    got = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(got) == {PEFT_PREFIX + k for k in expected}
    for k, e in expected.items():  # the fused B rows split back exactly
        assert torch.equal(got[PEFT_PREFIX + k], torch.from_numpy(ARRAYS[e["key"]])), k

    with torch.no_grad():  # float64 throughout: what remains is the order of summation, at 1e-16
        base = transformers_model(base_state())
        base_logits = base(IDS).logits
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval().double()(IDS).logits
        merged_logits = transformers_model(merged_state(label))(IDS).logits
    diff = (peft_logits - merged_logits).abs().max().item()
    print(
        f"{label}: max |PEFT - merged| logits {diff:.2e} (float64; max |logit| {merged_logits.abs().max():.1f})"
    )
    assert diff < 1e-10
    assert (peft_logits - base_logits).abs().max().item() > 0.1  # the adapter does something


def test_generate_takes_the_converted_adapter(tmp_path, capsys):
    """The fixtures' base (its vocabulary padded to a small BPE tokenizer's) + the converted adapter: generate's
    greedy tokens are PEFT's."""
    from peft import PeftModel

    from qwen15.demo.bpe import train_bpe

    texts = ["MindFormers LoRA weights in a PEFT adapter folder, 2024."] * 20
    tok = train_bpe(texts, 260)
    state = base_state()
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        pad = torch.zeros(len(tok) - GQA["vocab"], GQA["hidden"])
        state[k] = torch.cat(
            [state[k], 0.1 * torch.randn(pad.shape, generator=torch.Generator().manual_seed(0))]
        )
    base = transformers_model(state, torch.float32)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    assert convert(tmp_path, "lora_fused_interleaved_fp32", "--qkv-layout", "interleaved") == 0
    capsys.readouterr()
    prompt = "LoRA weights"
    ids = tok.encode(prompt)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(peft_model(torch.tensor([seq])).logits[0, -1].argmax()))
    common = ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--device", "cpu"]
    argv = ["generate", *common, "--dtype", "fp32", "--prompt", prompt, "--greedy", "--max-new-tokens", "6"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == prompt + tok.decode(seq[len(ids) :])
    assert "LoRA adapter" in captured.err


def test_base_weights_beside_the_adapter_are_reported_and_left_out(tmp_path, capsys):
    """A whole-network LoRA checkpoint (MindFormers' default save): same adapter, the base weights listed."""
    both = tmp_path / "finetuned.ckpt"
    with CkptWriter(both) as w:
        for f in ("sliced_fp32.ckpt", "lora_fp32.ckpt"):
            src = CkptFile(FIX / f)
            for t in src.tensors.values():
                w.add(t.name, t.dtype, t.shape, [t.read()])
            src.close()
    assert convert(tmp_path, str(both)) == 0
    assert "skipped 27 base-model and training tensors" in capsys.readouterr().out
    got = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for k, e in META["hf"]["lora_fp32"].items():
        assert torch.equal(got[PEFT_PREFIX + k], torch.from_numpy(ARRAYS[e["key"]]))
    # --to hf still refuses to drop the adapter silently, and says how to keep it
    argv = [
        "convert",
        "--from",
        "mindspore",
        str(both),
        str(tmp_path / "hf"),
        "--config",
        str(tmp_path / "lora.yaml"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--skip-lora" in err and "--to peft" in err and not (tmp_path / "hf").exists()
    assert main([*argv, "--skip-lora", "--quiet"]) == 0
    assert "skipped 28 LoRA tensors" in capsys.readouterr().out


def edited(tmp_path, drop: str | None = None, rank1: str | None = None) -> str:
    """lora_fp32.ckpt without tensor `drop`, or with module `rank1`'s pair cut to rank 1."""
    path = tmp_path / "edited.ckpt"
    src = CkptFile(FIX / "lora_fp32.ckpt")
    with CkptWriter(path) as w:
        for t in src.tensors.values():
            value = t.read()
            if t.name == drop:
                continue
            if rank1 and t.name.startswith(rank1):
                value = np.ascontiguousarray(value[:1] if t.name.endswith("_a") else value[:, :1])
            w.add(t.name, t.dtype, value.shape, [value])
    src.close()
    return str(path)


BAD = {  # case -> (checkpoint or editor, extra flags, YAML, words the one-line error must hold)
    "no LoRA tensors": ("sliced_fp32", [], None, ["no MindFormers LoRA tensors", "--to hf"]),
    "no pet_config": ("lora_fp32", [], yaml_text(""), ["no model.model_config.pet_config", "lora_alpha"]),
    "other pet type": ("lora_fp32", [], yaml_text(None, pet_type="slora"), ["pet_type", "slora"]),
    "rank differs from YAML": ("lora_fp32", [], yaml_text(None, lora_rank=4), ["rank 2", "lora_rank 4"]),
    "regex matches nothing": ("lora_fp32", [], yaml_text(".*dense"), ["'.*dense'", "matches none"]),
    "regex misses modules": ("lora_fp32", [], yaml_text(".*wq|.*wk"), ["does not match", "wv, wo, w1"]),
    "bad regex": ("lora_fp32", [], yaml_text("(wq"), ["not a regex"]),
    "ranks differ": ("rank1", [], None, ["ranks differ", "r 1"]),
    "half a pair": ("drop", [], None, ["other half", "wq.mindpet_delta_lora_b"]),
    "fused, no layout": ("lora_fused_concat_fp32", [], None, ["--qkv-layout concat", "w_qkv"]),
    "--skip-lora": ("lora_fp32", ["--skip-lora"], None, ["--skip-lora", "--to peft"]),
    "--tokenizer": ("lora_fp32", ["--tokenizer", "tok"], None, ["--tokenizer", "adapter folder"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    fixture, extra, yaml, words = BAD[case]
    if fixture == "rank1":
        fixture = edited(tmp_path, rank1="model.layers.1.attention.wq.")
    elif fixture == "drop":
        fixture = edited(tmp_path, drop="model.layers.0.attention.wq.mindpet_delta_lora_b")
    assert convert(tmp_path, fixture, *extra, yaml=yaml) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwen15 convert: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_config_json_and_existing_output_are_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict()))
    argv = [
        "convert",
        "--from",
        "mindspore",
        str(FIX / "lora_fp32.ckpt"),
        str(tmp_path / "adapter"),
        "--to",
        "peft",
    ]
    assert main([*argv, "--config", str(tmp_path / "config.json")]) == 2
    assert "holds no LoRA settings" in capsys.readouterr().err
    assert convert(tmp_path, "lora_fp32") == 0
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert convert(tmp_path, "lora_fp32") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert convert(tmp_path, "lora_fp32", "--overwrite") == 0


def hf_config_dict() -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": GQA["hidden"],
        "intermediate_size": GQA["inter"], "num_hidden_layers": GQA["layers"],
        "num_attention_heads": GQA["heads"], "num_key_value_heads": GQA["kv_heads"], "vocab_size": GQA["vocab"],
        "tie_word_embeddings": False,
    }  # fmt: skip
