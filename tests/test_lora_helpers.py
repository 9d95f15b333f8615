"""Helpers shared by the LoRA tests (no tests here): the LoRA training oracle (transformers + PEFT + torch's AdamW,
written independently of qwen15.train), reading adapters out of a training checkpoint, and PEFT adapters of tiny
random models."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from test_train_helpers import BASE, schedule

# The adapters of the training tests: every projection, rank 4, alpha 8.
LORA = {"lora.r": 4, "lora.alpha": 8.0, "lora.init_seed": 11}


def lora_overrides(**changes) -> dict:
    """Keyword overrides for test_train_helpers.overrides/config: LORA plus changes (double underscore = dot)."""
    return {**{k.replace(".", "__"): v for k, v in LORA.items()}, **changes}


def initial_adapters(cfg, spec, seed: int) -> dict[str, torch.Tensor]:
    """The A and B matrices the trainer starts from (qwen15.lora.modules.init_adapters on one process)."""
    from qwen15 import Qwen
    from qwen15.lora.modules import adapter_parameters, add_adapters, init_adapters

    with torch.device("meta"):
        model = Qwen(cfg)
    add_adapters(model, spec, init=False)
    model.to_empty(device="cpu")
    init_adapters(model, seed)
    return {k: v.detach().clone() for k, v in adapter_parameters(model).items()}


def hf_copy(ours):
    """transformers' Qwen2ForCausalLM holding the weights of our model (fp32)."""
    from transformers import Qwen2ForCausalLM

    from qwen15.hf_checkpoint import hf_state_dict

    from conftest import hf_config

    hf = Qwen2ForCausalLM(hf_config(ours.config))
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if ours.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def peft_adapter_names(peft_model) -> dict[str, torch.nn.Parameter]:
    """PEFT's adapter parameters under our names ("layers.0.self_attn.q_proj.lora_A.weight")."""
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            ours = name.removeprefix("base_model.model.model.").replace(".default", "")
            out[ours] = p
    return out


def reference_lora_training(data: Path, steps: int | None = None, targets=None, **changes):
    """The oracle of a LoRA run: transformers' Qwen2ForCausalLM with the trainer's base weights, PEFT adapters
    started from the trainer's A (B zero), the whole global batch in one forward, mean cross-entropy over unmasked
    labels, torch's AdamW over the adapters (they are matrices: all decay), clip_grad_norm_. Padded rows only (no
    packed documents: transformers would need its own masks). Returns (losses, adapters by our name)."""
    from peft import LoraConfig, get_peft_model

    from qwen15 import Qwen, get_preset
    from qwen15.data.dataset import RowSampler, TokenDataset
    from qwen15.lora.modules import TARGETS, LoRASpec

    p = dict(BASE, **LORA, **{k.replace("__", "."): v for k, v in changes.items()})
    steps = steps or p["train.steps"]
    cfg = get_preset(p["model.preset"]).replace(vocab_size=p["model.vocab_size"])
    if "model.num_hidden_layers" in p:
        cfg = cfg.replace(num_hidden_layers=p["model.num_hidden_layers"])
    targets = tuple(targets or TARGETS)
    spec = LoRASpec(p["lora.r"], p["lora.alpha"], target_modules=targets, rslora=p.get("lora.rslora", False))
    hf = hf_copy(Qwen.from_config(cfg, seed=p["model.init_seed"]))
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        use_rslora=spec.rslora,
    )
    model = get_peft_model(hf, config)
    adapters = peft_adapter_names(model)
    with torch.no_grad():
        for name, value in initial_adapters(cfg, spec, p["lora.init_seed"]).items():
            adapters[name].copy_(value)
    model.train()
    params = list(adapters.values())
    opt = torch.optim.AdamW(
        params, lr=p["optim.lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=p["optim.weight_decay"]
    )
    ds = TokenDataset(data)
    assert ds.doc_ids is None, "the PEFT oracle takes padded rows"
    sampler = RowSampler(len(ds), p["train.global_batch_size"], seed=p["data.seed"])
    losses = []
    for step in range(steps):
        b = ds.batch(sampler.next_batch())
        logits = model(input_ids=b["input_ids"]).logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, p["optim.clip_grad_norm"])
        for g in opt.param_groups:
            g["lr"] = schedule(
                step, p["train.steps"], p["optim.lr"], p["optim.min_lr"], p["optim.warmup_steps"]
            )
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in adapters.items()}


def checkpoint_adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA training checkpoint (any process count wrote it), read with DCP, by our names."""
    import json

    import torch.distributed.checkpoint as dcp

    from qwen15 import Qwen
    from qwen15.lora.modules import LoRASpec, adapter_parameters, add_adapters
    from qwen15.model_config import ModelConfig

    lora = json.loads((checkpoint / "trainer_state.json").read_text())["lora"]
    with torch.device("meta"):
        model = Qwen(ModelConfig.from_json_file(checkpoint / "config.json"))
    add_adapters(model, LoRASpec(lora["r"], lora["alpha"], target_modules=lora["target_modules"]), init=False)
    state = {k: torch.empty(v.shape) for k, v in adapter_parameters(model).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(checkpoint / "state"), no_dist=True)
    return state


def random_peft_model(cfg, seed: int = 0, **lora_kwargs):
    """PEFT over transformers' Qwen2 with random weights (conftest.random_hf_model) and random, non-zero adapters
    (a fresh B is zero, which would hide a wrong A or scaling)."""
    from peft import LoraConfig, get_peft_model

    from conftest import random_hf_model

    kwargs = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        **lora_kwargs,
    }
    model = get_peft_model(random_hf_model(cfg, seed=seed), LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()
