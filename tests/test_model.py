"""Logits parity with transformers' Qwen2ForCausalLM (the reference) on random weights, and the model's own paths
(packed documents, KV cache, left padding) against the plain forward."""

import pytest
import torch

from qwen15 import KVCache, Qwen
from qwen15.model_config import get_preset

from conftest import load_into_ours, random_hf_model

pytest.importorskip("transformers")

FAMILIES = ["tiny", "tiny-mha", "tiny-gqa"]


def small(name, vocab=512):
    return get_preset(name).replace(vocab_size=vocab)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_fp32(name):
    cfg = small(name)
    hf = random_hf_model(cfg, seed=1)
    ours = load_into_ours(hf, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert got.shape == (3, 41, cfg.vocab_size)
    assert (ref - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_bf16(name, tmp_path):
    """Both loaded in bf16 from the same checkpoint: identical logits. (Casting a transformers model with
    `.to(bfloat16)` instead also rounds its rotary inv_freq buffer to bf16 — the known drift we do not copy.)"""
    from transformers import AutoModelForCausalLM

    cfg = small(name)
    random_hf_model(cfg, seed=2).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = Qwen.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert got.dtype == torch.bfloat16
    assert (ref.float() - got.float()).abs().max().item() <= 1e-6


def test_dropped_qkv_bias_would_be_caught():
    """The parity check is sensitive to the q/k/v bias (what broken converters drop)."""
    cfg = small("tiny")
    hf = random_hf_model(cfg, seed=3)
    ours = load_into_ours(hf, cfg)
    with torch.no_grad():
        ours.layers["0"].self_attn.k_proj.bias.zero_()
        ids = torch.randint(0, cfg.vocab_size, (1, 16))
        assert (hf(ids).logits - ours(ids)).abs().max().item() > 1e-2


@pytest.mark.slow
def test_full_size_0_5b_logits_match_transformers():
    cfg = get_preset("qwen1.5-0.5b")
    hf = random_hf_model(cfg, seed=4)
    ours = load_into_ours(hf, cfg)
    ids = torch.randint(0, 151646, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (ref - got).abs().max().item() <= 1e-4


def _random_model(name="tiny-gqa", seed=0):
    return Qwen.from_config(small(name), seed=seed).eval()


def test_packed_documents_equal_separate_runs():
    model = _random_model()
    g = torch.Generator().manual_seed(5)
    lengths = [7, 12, 5]
    docs = [torch.randint(0, 512, (n,), generator=g) for n in lengths]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        got = model(packed, document_ids=doc_ids)[0]
        ref = torch.cat([model(d[None])[0] for d in docs])
        unmasked = model(packed)[0]
    assert (got - ref).abs().max().item() <= 1e-5
    assert (unmasked[lengths[0] :] - ref[lengths[0] :]).abs().max().item() > 1e-3  # the mask matters


def test_kv_cache_decode_equals_full_forward():
    model = _random_model("tiny-gqa", seed=1)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.num_hidden_layers, batch_size=2, max_len=32)
        steps = [model(ids[:, :12], kv_cache=cache, cache_positions=torch.arange(12))]
        for t in range(12, 20):
            steps.append(model(ids[:, t : t + 1], kv_cache=cache, cache_positions=torch.tensor([t])))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_left_padding_with_key_padding_mask_equals_unpadded():
    model = _random_model("tiny", seed=2)
    g = torch.Generator().manual_seed(7)
    short, long_ = torch.randint(0, 512, (5,), generator=g), torch.randint(0, 512, (9,), generator=g)
    pad = 4
    ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long_])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :pad] = False
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = KVCache(model.config.num_hidden_layers, batch_size=2, max_len=16)
        got = model(
            ids,
            kv_cache=cache,
            cache_positions=torch.arange(9),
            position_ids=positions,
            key_padding_mask=valid,
        )
        nxt = torch.randint(0, 512, (2, 1), generator=g)
        valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = model(
            nxt,
            kv_cache=cache,
            cache_positions=torch.tensor([9]),
            position_ids=positions[:, -1:] + 1,
            key_padding_mask=valid,
        )
        ref_short = model(torch.cat([short, nxt[0]])[None])[0]
        ref_long = model(torch.cat([long_, nxt[1]])[None])[0]
    assert torch.isfinite(got).all()
    assert (got[0, pad:] - ref_short[:5]).abs().max().item() <= 1e-5
    assert (got[1] - ref_long[:9]).abs().max().item() <= 1e-5
    assert (step[0, 0] - ref_short[5]).abs().max().item() <= 1e-5
    assert (step[1, 0] - ref_long[9]).abs().max().item() <= 1e-5


def test_last_only_and_hidden():
    model = _random_model("tiny")
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(model(ids, last_only=True), full[:, -1:], atol=1e-6)
        hidden = model(ids, return_hidden=True)
    assert hidden.shape == (2, 6, model.config.hidden_size)
    assert torch.allclose(model.lm_head(hidden), full)


def test_tied_embeddings_share_storage():
    model = _random_model("tiny")
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = _random_model("tiny-mha")
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_training_backward_runs_and_init_is_reference_like():
    model = _random_model("tiny-gqa")
    std = model.layers["0"].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025
    assert torch.all(model.layers["0"].self_attn.q_proj.bias == 0)
    model.train()
    ids = torch.randint(0, 512, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
