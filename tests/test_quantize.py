"""int8 weight-only quantization: the products, greedy agreement with fp32, and memory against bf16."""

from __future__ import annotations

import pytest
import torch

from qwen15 import Qwen
from qwen15.generation import generate
from qwen15.model_config import get_preset
from qwen15.quantize import Int8Linear, quantize_int8, quantize_rows, weight_nbytes


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses the full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_dequantized_product(dtype, bias):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 80, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(80, generator=g))
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 96, generator=g).to(dtype)
    deq = q.weight.float() * q.scales.float()[:, None]
    ref = x.float() @ deq.T + (lin.bias.float() if bias else 0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(q(x).float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "tiny-gqa"])
def test_greedy_agreement_with_fp32(name):
    """A random tiny model has nearly flat logits, the hardest case for any approximation; we require most of
    the teacher-forced top-1 predictions and of the free-running greedy tokens to agree."""
    cfg = get_preset(name).replace(vocab_size=1000)
    ref_model = Qwen.from_config(cfg, seed=0)
    q = quantize_int8(Qwen.from_config(cfg, seed=0))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    ref = generate(ref_model, None, prompts, max_new_tokens=32, temperature=0, stop_token_ids=[])
    out = generate(q, None, prompts, max_new_tokens=32, temperature=0, stop_token_ids=[])
    agree = sum(a == b for r, o in zip(ref, out) for a, b in zip(r.token_ids, o.token_ids)) / (4 * 32)
    seqs = torch.tensor([p[:5] + r.token_ids for p, r in zip(prompts, ref)])
    with torch.no_grad():
        forced = (ref_model(seqs).argmax(-1) == q(seqs).argmax(-1)).float().mean().item()
    print(f"{name}: int8 greedy token agreement {agree:.0%}, teacher-forced top-1 agreement {forced:.1%}")
    assert forced >= 0.9
    assert agree >= 0.5
    assert all(o.token_ids[0] == r.token_ids[0] for r, o in zip(ref, out))


@pytest.mark.parametrize("name", ["tiny", "tiny-mha"])
def test_weights_take_half_of_bf16(name):
    cfg = get_preset(name)
    bf16 = Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)
    before = weight_nbytes(bf16)
    q = quantize_int8(bf16)
    ratio = weight_nbytes(q) / before
    print(f"{name}: int8 weights {ratio:.3f} of bf16")
    assert ratio < 0.52
    if cfg.tie_word_embeddings:  # the tied output layer reads the same int8 table
        assert q.lm_head.weight.data_ptr() == q.embed_tokens.weight.data_ptr()


def dequantized(model: Qwen) -> Qwen:
    """The oracle of int8 weight-only: the same model with every matrix (and the embedding) replaced, in its
    own dtype, by int8 x scale as quantize_rows gives them; plain nn.Linear / nn.Embedding."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                q, s = quantize_rows(module.weight)
                module.weight.copy_((q.float() * s[:, None]).to(module.weight.dtype))
    model.tie_weights()
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "tiny-gqa"])
def test_int8_model_is_the_model_of_its_dequantized_weights(name):
    """With fp32 activations the int8 model computes the dequantized model's logits to fp32 rounding (bound 1e-5
    x the logits' scale; measured <= 1.1e-6 at scale ~1.5) and generates its greedy tokens."""
    cfg = get_preset(name).replace(vocab_size=1000)
    q = quantize_int8(Qwen.from_config(cfg, seed=0))
    ref = dequantized(Qwen.from_config(cfg, seed=0))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = q(ids), ref(ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (got - Qwen.from_config(cfg, seed=0)(ids)).abs().max().item() > 1e-3  # int8 is really applied
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    a = generate(q, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    b = generate(ref, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_quantized_model_keeps_bf16_activations_and_generates():
    """bf16 activations: the logits of the dequantized bf16 model within 2**-5 x their scale (measured 1.5e-2 at
    scale 1.6: a couple of bf16 ulps, the int8 kernel rounds its fp32 products once, bf16 linears per layer), in
    bf16; generation starts with the token those logits pick."""
    cfg = get_preset("tiny").replace(vocab_size=1000)
    q = quantize_int8(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16))
    ref = dequantized(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16))
    ids = torch.tensor([[1, 2, 3, 17, 400, 9]])
    with torch.no_grad():
        logits, want = q(ids), ref(ids)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - want.float()).abs().max().item() <= 2**-5 * want.float().abs().max().item()
    out = generate(q, None, ids[0].tolist(), max_new_tokens=4, temperature=0, stop_token_ids=[])
    assert len(out.token_ids) == 4 and out.token_ids[0] == int(logits[0, -1].float().argmax())


@pytest.mark.parametrize("name", ["tiny", "tiny-mha"])
def test_cpu_prepacked_bf16_is_bit_identical(name):
    from qwen15.quantize import PackedLinear, can_pack_for_cpu, pack_for_cpu

    cfg = get_preset(name).replace(vocab_size=1000)
    plain = Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)
    packed = pack_for_cpu(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16))
    if not can_pack_for_cpu(plain):
        pytest.skip("oneDNN is not available in this build")
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(
        packed.layers["0"].mlp.up_proj, PackedLinear
    )
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids), packed(ids))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = generate(plain, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    b = generate(packed, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_cpu_prepacked_fp32_equals_plain_to_rounding():
    """fp32 prepacked for oneDNN: a different kernel (and summation order) than torch's matrix-vector product,
    so equal to fp32 rounding, with the same greedy tokens."""
    from qwen15.quantize import PackedLinear, can_pack_for_cpu, pack_for_cpu

    cfg = get_preset("tiny-gqa").replace(vocab_size=1000)
    plain = Qwen.from_config(cfg, seed=0)
    if not can_pack_for_cpu(plain):
        pytest.skip("oneDNN is not available in this build")
    packed = pack_for_cpu(Qwen.from_config(cfg, seed=0))
    assert isinstance(packed.layers["0"].self_attn.q_proj, PackedLinear)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids), packed(ids)
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    x = generate(plain, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    y = generate(packed, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    assert [r.token_ids for r in x] == [r.token_ids for r in y]


def test_pack_leaves_gpu_and_int8_models_alone():
    from qwen15.quantize import pack_for_cpu, quantize_int8

    model = quantize_int8(Qwen.from_config(get_preset("tiny").replace(vocab_size=1000), seed=0))
    assert not any(type(m).__name__ == "PackedLinear" for m in pack_for_cpu(model).modules())
