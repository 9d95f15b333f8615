"""Shared test helpers: where the shared data lives, and tiny random models built by transformers (the oracle)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("QWEN15_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_DATA = SHARED / "data"
SHARED_TOKENIZER = SHARED / "tokenizer" / "qwen1.5"

needs_shared = pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason=f"{SHARED} (shared data) is absent")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip(f"{SHARED_TOKENIZER} is absent")
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def tokenizer(qwen_tokenizer_dir):
    from qwen15 import Tokenizer

    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(qwen_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


def hf_config(cfg, **overrides):
    """A transformers Qwen2Config with the shape of our ModelConfig."""
    from transformers import Qwen2Config

    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151643,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def random_hf_model(cfg, seed: int = 0, dtype=None):
    """transformers' Qwen2ForCausalLM with random weights, biases and norms made non-trivial so bugs show."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # a dropped q/k/v bias must change the logits visibly
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_into_ours(hf_model, cfg, dtype=None):
    """Our model with the weights of a transformers model (through the HF name mapping)."""
    import torch

    from qwen15 import Qwen
    from qwen15.hf_folder import our_name

    ours = Qwen(cfg)
    state = {our_name(k): v for k, v in hf_model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    ours.load_state_dict(state, strict=True)
    ours.tie_weights()
    ours.eval()
    return ours.to(dtype or torch.float32)
