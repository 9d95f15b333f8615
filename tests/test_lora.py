"""LoRA against PEFT (the oracle): adapters PEFT saved give our model PEFT's logits and ours give PEFT's model ours,
in files PEFT reads back to the same LoraConfig; merging equals PEFT's merge_and_unload; fused, packed and int8
bases keep the adapter; what we cannot honour or what does not fit is refused naming the file and key. fp32
everywhere; tolerance 1e-5 relative to the logits' scale (the same products, summed in another order)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from test_lora_helpers import peft_adapter_names, random_peft_model

from qwen15 import Qwen, get_preset
from qwen15.lora import (
    TARGETS,
    AdapterError,
    LoRALinear,
    LoRASpec,
    add_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
)

from conftest import random_hf_model

pytest.importorskip("peft")

SHAPES = {
    "tied-0.5b-like": get_preset("tiny").replace(vocab_size=256),
    "untied-gqa": get_preset("tiny-gqa").replace(vocab_size=256),
}


def ids(vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.fixture
def base_dir(tmp_path):
    """A tied 0.5B-like tiny base saved by transformers (random_peft_model(..., seed=0) adapts these weights)."""
    folder = tmp_path / "base"
    random_hf_model(SHAPES["tied-0.5b-like"], seed=0).save_pretrained(folder)
    return folder


def test_fresh_adapters_start_as_the_base_with_peft_initialisation():
    """B zero: the first forward is the base model's, bit for bit; A uniform within 1/sqrt(in) (PEFT's
    kaiming_uniform_(a=sqrt(5))), and every base parameter frozen."""
    cfg = SHAPES["untied-gqa"]
    model = Qwen.from_config(cfg, seed=0)
    with torch.no_grad():
        before = model(ids())
    added = add_adapters(model, LoRASpec(r=8, alpha=16), generator=torch.Generator().manual_seed(0))
    assert len(added) == 7 * cfg.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(model(ids()), before)
    a = torch.cat([m.lora_A.weight.flatten() for m in added.values() if m.in_features == cfg.hidden_size])
    bound = 1 / math.sqrt(cfg.hidden_size)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(not m.lora_B.weight.any() for m in added.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{h}.weight" for n in added for h in "AB"}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": list(TARGETS), "use_rslora": True, "r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
    ],
    ids=["q-v", "all-rslora-dropout"],
)
def test_peft_adapters_load_into_ours_and_ours_into_peft_with_equal_logits(tmp_path, shape, lora_kwargs):
    cfg = SHAPES[shape]
    peft_model = random_peft_model(cfg, seed=1, **lora_kwargs)
    peft_model.save_pretrained(tmp_path / "peft")
    base = tmp_path / "base"
    random_hf_model(cfg, seed=1).save_pretrained(base)  # the same base weights, without the adapter layers
    from peft import PeftModel

    with torch.no_grad():
        expected = peft_model(ids()).logits
        ours = load_adapter(Qwen.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
        assert close(ours(ids()), expected)
        save_adapter(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(random_hf_model(cfg, seed=1), tmp_path / "ours").eval()
        assert close(back(ids(seed=1)).logits, ours(ids(seed=1)))
    assert ours.lora_spec.rslora == lora_kwargs.get("use_rslora", False)
    assert (ours.lora_spec.r, ours.lora_spec.alpha) == (
        lora_kwargs.get("r", 4),
        lora_kwargs.get("lora_alpha", 8),
    )


def test_our_adapter_files_are_what_peft_writes(tmp_path):
    """The same adapter saved by PEFT and by us: the same safetensors keys, shapes, dtypes, values and metadata,
    and a config PEFT reads back to the same LoraConfig."""
    from peft import LoraConfig

    cfg = SHAPES["untied-gqa"]
    kwargs = {"target_modules": list(TARGETS), "r": 8, "lora_alpha": 16, "use_rslora": True}
    peft_model = random_peft_model(cfg, seed=2, **kwargs)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = Qwen(cfg)
    add_adapters(ours, LoRASpec(8, 16, rslora=True), init=False)
    with torch.no_grad():
        for name, p in peft_adapter_names(peft_model).items():
            ours.get_parameter(name).copy_(p)
    save_adapter(ours, tmp_path / "ours")

    def contents(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)

    (meta_p, peft_tensors), (meta_o, our_tensors) = contents(tmp_path / "peft"), contents(tmp_path / "ours")
    assert meta_o == meta_p == {"format": "pt"}
    assert sorted(our_tensors) == sorted(peft_tensors)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in our_tensors
    for key, value in peft_tensors.items():
        assert our_tensors[key].dtype == value.dtype == torch.float32 and torch.equal(our_tensors[key], value)
    theirs = LoraConfig.from_pretrained(tmp_path / "peft").to_dict()
    mine = LoraConfig.from_pretrained(tmp_path / "ours").to_dict()
    for d in (theirs, mine):
        d.pop("base_model_name_or_path")
        d["target_modules"] = sorted(d["target_modules"])
    assert mine == theirs
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    on_disk = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in (
        "peft_type",
        "r",
        "lora_alpha",
        "bias",
        "use_rslora",
        "task_type",
        "use_dora",
        "modules_to_save",
    ):
        assert written[key] == on_disk[key], key


def test_merge_equals_peft_merge_and_the_merged_folder_loads_in_transformers(tmp_path):
    """Our merge (fp32, cast once) gives PEFT's merge_and_unload weights; the merged model's logits equal the
    unmerged ones; `qwen15 lora merge` writes a folder transformers loads with those logits, still tied."""
    from transformers import Qwen2ForCausalLM

    from qwen15.cli import main
    from qwen15.hf_checkpoint import hf_state_dict

    cfg = SHAPES["tied-0.5b-like"]
    peft_model = random_peft_model(cfg, seed=3, target_modules=list(TARGETS), use_rslora=True)
    peft_model.save_pretrained(tmp_path / "adapter")
    random_hf_model(cfg, seed=3).save_pretrained(tmp_path / "base")
    ours = load_adapter(Qwen.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        unmerged = ours(ids())
        merged = merge_adapters(ours)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert close(merged(ids()), unmerged)
    reference = peft_model.merge_and_unload().state_dict()
    state = hf_state_dict(merged)
    assert max(float((state[k] - reference[k]).abs().max()) for k in state) <= 1e-6
    assert main(["lora", "merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged"), "--dtype", "float32"]) == 0  # fmt: skip
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert close(hf(ids()).logits, unmerged)


def test_fused_packed_int8_and_int4_bases_keep_the_adapter(tmp_path):
    """prepare_for_inference fuses adapted q/k/v and gate/up into one LoRALinear each (logits equal), packs
    the base for oneDNN under the adapter, or quantizes it to int8 or int4 (the adapter's contribution is
    unchanged)."""
    import copy

    from qwen15.prepare import prepare_for_inference
    from qwen15.quantize import Int4Linear, Int8Linear

    cfg = SHAPES["untied-gqa"]
    peft_model = random_peft_model(cfg, seed=4, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    random_hf_model(cfg, seed=4).save_pretrained(tmp_path / "base")
    ours = load_adapter(Qwen.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(ids())
        fused = prepare_for_inference(copy.deepcopy(ours))
        attn, mlp = fused.layers["0"].self_attn, fused.layers["0"].mlp
        assert isinstance(attn.qkv_proj, LoRALinear) and attn.qkv_proj.r == 8  # q and v: 4 + 4
        assert isinstance(mlp.gate_up_proj, LoRALinear) and mlp.gate_up_proj.r == 4
        assert attn.qkv_proj.base_layer is not None  # oneDNN-packed base under the adapter
        assert close(fused(ids()), expected)
        assert close(fused(ids()), peft_model(ids()).logits)
        int8 = prepare_for_inference(copy.deepcopy(ours), "int8")
        q = int8.layers["1"].self_attn.qkv_proj
        assert isinstance(q, LoRALinear) and isinstance(q.base_layer, Int8Linear)
        x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        adapter_part = q.lora_B(q.lora_A(x)) * q.scaling
        assert torch.equal(q(x), q.base_layer(x) + adapter_part)
        assert (int8(ids()) - expected).abs().max() < 0.05 * expected.abs().max()  # int8's own error
        int4 = prepare_for_inference(copy.deepcopy(ours), "int4")
        q = int4.layers["1"].self_attn.qkv_proj
        assert isinstance(q, LoRALinear) and isinstance(q.base_layer, Int4Linear)
        adapter_part = q.lora_B(q.lora_A(x)) * q.scaling
        assert torch.equal(q(x), q.base_layer(x) + adapter_part)
        err = ((int4(ids()) - expected).abs().max() / expected.abs().max()).item()
        assert err < 0.25, err  # int4's own error on random weights, group 64 (measured 0.17)


# ---------------------------------------------------------------------------------------------- bad input


def write_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, r"adapter_config.json: use_dora is True: DoRA .* cannot apply"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save is \['lm_head'\]: modules_to_save holds whole"),
        ({"bias": "lora_only"}, r"bias is 'lora_only': the adapter trained biases"),
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'; only LoRA adapters"),
        ({"r": 0}, r"adapter_config.json: r must be a positive integer"),
        ({"r": 8}, r"adapter_config.json says r 8 but layers.0.self_attn.q_proj has r 4"),
        (
            {"target_modules": ["c_attn"]},
            r"target_modules names 'c_attn', which a Qwen1.5 model does not have",
        ),
        ({"rank_pattern": {"q_proj": 8}}, r"rank_pattern is .* gives modules their own ranks"),
    ],
)
def test_adapter_configs_we_cannot_honour_are_refused(tmp_path, base_dir, change, message):
    peft_model = random_peft_model(SHAPES["tied-0.5b-like"], seed=0)
    peft_model.save_pretrained(tmp_path / "adapter")
    write_config(tmp_path / "adapter", **change)
    model = Qwen.from_pretrained(base_dir)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was changed


def test_bad_adapter_folders_and_other_shapes_are_refused_naming_the_file(tmp_path, base_dir):
    from qwen15.errors import UserError

    model = Qwen.from_pretrained(base_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"empty: no adapter_config.json; an adapter folder holds"):
        load_adapter(model, tmp_path / "empty")
    peft_model = random_peft_model(SHAPES["tied-0.5b-like"], seed=0)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    good = config.read_text()
    config.write_text('{"peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(UserError, match=r"adapter_config.json:2:\d+: malformed JSON"):
        load_adapter(model, tmp_path / "adapter")
    config.write_text(good)
    (tmp_path / "adapter" / "adapter_model.safetensors").rename(tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(
        AdapterError, match=r"no adapter_model.safetensors. It holds adapter_model.bin .* never"
    ):
        load_adapter(model, tmp_path / "adapter")
    wide = random_peft_model(SHAPES["tied-0.5b-like"].replace(hidden_size=192), seed=0)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError, match=r"the adapter does not fit this base model — wrong shapes: .*q_proj"):
        load_adapter(model, tmp_path / "wide")
    deep = random_peft_model(SHAPES["tied-0.5b-like"].replace(num_hidden_layers=3), seed=0)
    deep.save_pretrained(tmp_path / "deep")
    with pytest.raises(UserError, match=r"unexpected tensors: base_model.model.model.layers.2.self_attn"):
        load_adapter(model, tmp_path / "deep")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_merge_command_refuses_bad_input_and_writes_nothing(tmp_path, base_dir, capsys):
    from qwen15.cli import main

    random_peft_model(SHAPES["tied-0.5b-like"], seed=0).save_pretrained(tmp_path / "adapter")
    write_config(tmp_path / "adapter", use_dora=True)
    out = tmp_path / "merged"
    args = [
        "lora",
        "merge",
        "--model",
        str(base_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--output",
        str(out),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen15 lora: error: ") and "use_dora" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    write_config(tmp_path / "adapter", use_dora=False)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*args[:-1], str(base_dir)]) == 2 and "would delete that input" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora__r": 0}, r"lora.r must be a positive integer"),
        (
            {"lora__r": 4, "lora__target_modules": "[q_proj, c_attn]"},
            r"lora.target_modules: 'c_attn' is not a",
        ),
        ({"lora__r": 4, "lora__target_modules": "[lm_head]"}, r"lm_head cannot be adapted"),
        ({"lora__alpha": 32}, r"lora.alpha is set but lora.r is not"),
        ({"lora__r": 4, "lora__dropout": 1.5}, r"lora.dropout must lie in \[0, 1\)"),
        ({"lora__r": 4, "parallel__pp": 2}, r"lora: adapters train with .* parallel.pp must be 1"),
    ],
)
def test_bad_lora_sections_name_the_key(tmp_path, changes, message):
    from train_helpers import config

    from qwen15.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match=message):
        config(tmp_path / "data", tmp_path / "run", **changes)


# ---------------------------------------------------------------------------------------------- the commands


@pytest.fixture
def bpe_base(tmp_path):
    """A tiny untied GQA base with its own small BPE tokenizer saved beside it, and a PEFT adapter on it."""
    from qwen15 import Tokenizer
    from qwen15.demo.bpe import train_bpe

    texts = ["The quick brown fox jumps over 12 lazy dogs.", "What is 482 plus 317? 482 + 317 = 799."] * 50
    tok = train_bpe(texts, 300)
    cfg = SHAPES["untied-gqa"].replace(vocab_size=len(tok))  # no padding rows: every id decodes
    base = tmp_path / "base"
    random_hf_model(cfg, seed=6).save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = random_peft_model(cfg, seed=6, target_modules=list(TARGETS), use_rslora=True)
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", peft_model, Tokenizer.from_pretrained(base)


def test_generate_chat_and_eval_take_the_adapter(bpe_base, tmp_path, capsys):
    """`--adapter`: generate's greedy text is PEFT's greedy continuation; eval ppl's perplexity is the one of
    PEFT's logits; chat answers; a bad adapter stops before the model loads, with one line."""
    import torch.nn.functional as F

    from qwen15.cli import main

    base, adapter, peft_model, tok = bpe_base
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(peft_model(torch.tensor([seq])).logits[0, -1].argmax()))
    common = ["--model", str(base), "--adapter", str(adapter), "--device", "cpu", "--dtype", "fp32"]
    assert main(["generate", *common, "--prompt", prompt, "--greedy", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == prompt + tok.decode(seq[len(ids) :])
    assert "LoRA adapter" in captured.err and "r 4" in captured.err

    text = tmp_path / "text.txt"
    text.write_text("What is 482 plus 317? The quick brown fox jumps over 12 lazy dogs. " * 3)
    assert main(["eval", "ppl", *common, "--data", str(text), "--seq-length", "512", "--no-progress"]) == 0
    out = capsys.readouterr().out
    token_ids = torch.tensor([tok.encode(text.read_text())])
    with torch.no_grad():
        logits = peft_model(token_ids).logits[0, :-1]
    expected = math.exp(float(F.cross_entropy(logits, token_ids[0, 1:])))
    printed = float(out.split("perplexity: ")[1].split()[0])
    # the same fp32 logits summed in another order (CPU kernels differ between machines): ~1e-6 relative
    assert printed == pytest.approx(expected, rel=1e-5)

    assert main(["chat", *common, "--predict-data", "What is 482 plus 317?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()

    write_config(adapter, use_dora=True)
    assert main(["generate", *common, "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen15 generate: error: ") and "use_dora" in err and "loaded " not in err
