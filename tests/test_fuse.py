"""Fused projections (inference): one q/k/v matrix and one gate/up matrix per block give the same outputs."""

from __future__ import annotations

import pytest
import torch

from qwen15 import Qwen, generate
from qwen15.fuse import FusedAttention, FusedMLP, fuse_projections
from qwen15.hf_folder import CheckpointError
from qwen15.model import Attention
from qwen15.model_config import get_preset


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "tiny-gqa"])
def test_fused_model_gives_the_same_logits_and_tokens(name):
    cfg = get_preset(name).replace(vocab_size=1000)
    plain = Qwen.from_config(cfg, seed=0)
    fused = fuse_projections(Qwen.from_config(cfg, seed=0))
    attn = fused.layers["0"].self_attn
    assert isinstance(attn, FusedAttention) and isinstance(fused.layers["1"].mlp, FusedMLP)
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.weight.shape[0] == sum(attn.qkv_sizes)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids), fused(ids)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    x = generate(plain, None, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    y = generate(fused, None, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    assert [r.token_ids for r in x] == [r.token_ids for r in y]


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_fused_attention_rotates_q_and_k_as_the_plain_one(name):
    """Rotating q and k heads in one call gives exactly what the plain attention's path (separate q, k, v views,
    two rotary calls) gives on the same fused projection."""
    from qwen15.model import rotary_cos_sin

    cfg = get_preset(name).replace(vocab_size=1000)
    fused = FusedAttention(Qwen.from_config(cfg, seed=0).layers["0"].self_attn)
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary_cos_sin(torch.arange(3, 8)[None].expand(2, 5), cfg.head_dim, cfg.rope_theta, x.dtype)
    with torch.no_grad():
        expected = Attention.rotated_heads(fused, x, cos, sin)  # through FusedAttention.project
        got = fused.rotated_heads(x, cos, sin)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape and torch.equal(e, g)
    assert got[1].shape[1] == cfg.num_key_value_heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_int8_model_equals_the_unfused_int8_model(dtype):
    """Fusing before quantizing gives the same int8 rows and scales (quantize_rows works row by row), so the same
    logits: bound 1e-6 x their scale in fp32, one bf16 ulp of it in bf16 (measured: identical); same tokens."""
    from qwen15.quantize import Int8Linear, quantize_int8

    cfg = get_preset("tiny-gqa").replace(vocab_size=1000)
    fused = quantize_int8(fuse_projections(Qwen.from_config(cfg, seed=0, dtype=dtype)))
    plain = quantize_int8(Qwen.from_config(cfg, seed=0, dtype=dtype))
    assert isinstance(fused.layers["0"].self_attn.qkv_proj, Int8Linear)
    assert isinstance(fused.layers["0"].mlp.gate_up_proj, Int8Linear)
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fused(ids).float(), plain(ids).float()
    bound = (1e-6 if dtype == torch.float32 else 2**-8) * b.abs().max().item()
    assert (a - b).abs().max().item() <= bound
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    x = generate(fused, None, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    y = generate(plain, None, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    assert [r.token_ids for r in x] == [r.token_ids for r in y]


def test_fused_model_packs():
    from qwen15.quantize import PackedLinear, pack_for_cpu

    cfg = get_preset("tiny-gqa").replace(vocab_size=1000)
    p = pack_for_cpu(fuse_projections(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)))
    ref = Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want = p(ids).float(), ref(ids).float()
    assert (out - want).abs().max().item() < 0.05 * want.abs().max().item()
    if torch.backends.mkldnn.is_available():
        assert isinstance(p.layers["0"].mlp.gate_up_proj, PackedLinear)


def test_a_fused_model_refuses_to_save(tmp_path):
    model = fuse_projections(Qwen.from_config(get_preset("tiny").replace(vocab_size=1000), seed=0))
    with pytest.raises(CheckpointError, match="prepared for inference"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
