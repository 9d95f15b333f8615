"""The fused small operations of CPU decode steps (qwen15.cpu_decode, quantize/cpu_decode_ops.c): each against the
torch operations it replaces, the swapped model against the model's own code, and the forwards that must not
take them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qwen15 import Qwen
from qwen15.cpu_decode import CPUDecodeBlock, CPUDecodeRMSNorm
from qwen15.model import Block, KVCache, RMSNorm, apply_rotary
from qwen15.model_config import get_preset
from qwen15.prepare import prepare_for_inference
from qwen15.quantize import kernels

pytestmark = pytest.mark.skipif(
    kernels.library() is None, reason=f"no CPU kernels: {kernels.unavailable_reason()}"
)
DTYPES = [torch.float32, torch.bfloat16]


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units of the last place of their dtype (bf16 or fp32)."""
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return int((a.view(view).long() - b.view(view).long()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 16, 17, 100, 151936])
def test_argmax_is_torch_argmax(dtype, n):
    """kernels.argmax (the greedy pick on CPU) = torch.argmax, on the cases where a lane-wise scan could go wrong:
    ties (first index), the maximum in the tail past the last 16 lanes, all -inf, +inf twice, NaN (the first NaN
    wins, as in torch), and a column slice (the engine's valid-vocabulary view)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(12, n, generator=g).to(dtype)
    inner = min(5, n - 2)
    x[1, inner] = x[1, n - 1] = float("nan")
    x[2] = float("-inf")
    x[3] = 1.0
    x[4, n // 2 :] = 100.0
    x[5, inner] = x[5, n - 1] = float("inf")
    x[6, n - 1] = 1e4
    x[9, 0] = x[9, 1] = 1e4  # a tie
    x[7, 0] = float("nan")
    x[8, n - 1] = float("nan")
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    cut = x[:, : n - 1]
    assert torch.equal(kernels.argmax(cut), cut.argmax(-1))


def test_greedy_sampling_reads_bf16_logits_as_fp32():
    """sample() picks greedy rows from the model's bf16 logits (no fp32 copy) with the ids past valid_vocab left
    out, and reports log-probabilities from fp32 ones: the same as from the fp32 logits."""
    from qwen15.engine.sampler import RowState, sample
    from qwen15.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).bfloat16()
    logits[0, 990] = 50.0  # past valid_vocab: never picked
    greedy = SamplingParams(temperature=0.0)
    rows = [RowState(greedy, None, None, [], 1000, "cpu") for _ in range(5)]
    rows.append(RowState(greedy, None, 3, [], 1000, "cpu"))
    a = sample(logits, rows, valid_vocab=900)
    b = sample(logits.float(), rows, valid_vocab=900)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.max() < 900
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.top_logprobs, b.top_logprobs)
    assert torch.equal(a.chosen, b.chosen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_add(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1024, generator=g).to(dtype)
    r = torch.randn(5, 1024, generator=g).to(dtype)
    norm = RMSNorm(1024, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(1024, generator=g) + 0.5)
        s, y = kernels.rms_norm(x, norm.weight, norm.eps, residual=r)
        assert torch.equal(s, x + r)  # one rounding of the sum, as torch's add
        # the mean's sum runs in another order: the bf16 output may round one place differently
        assert ulps(y, norm(x + r)) <= (1 if dtype == torch.bfloat16 else 8)
        same, y1 = kernels.rms_norm(x, norm.weight, norm.eps)
        assert same is x and ulps(y1, norm(x)) <= (1 if dtype == torch.bfloat16 else 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_write_equal_the_model(dtype):
    g = torch.Generator().manual_seed(1)
    b, heads, kv_heads, hd, length = 3, 4, 2, 64, 12
    qkv = torch.randn(b, (heads + 2 * kv_heads) * hd, generator=g).to(dtype)
    angles = torch.rand(b, 1, hd // 2, generator=g) * 50
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    kc = torch.zeros(b + 1, kv_heads, length, hd, dtype=dtype)  # a cache of more rows than the batch
    vc = torch.zeros_like(kc)
    slots = torch.tensor([5, 0, 11])
    q = kernels.rope_store(qkv, cos[:, 0], sin[:, 0], kc, vc, slots, heads, kv_heads, hd)
    heads_of = qkv.view(b, 1, heads + 2 * kv_heads, hd).transpose(1, 2)
    want_q = apply_rotary(heads_of[:, :heads], cos, sin)
    want_k = apply_rotary(heads_of[:, heads : heads + kv_heads], cos, sin)
    assert torch.equal(q, want_q[:, :, 0])  # the same products and sum, rounded at the same places
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(kc[i, :, slot], want_k[i, :, 0])
        assert torch.equal(vc[i, :, slot], heads_of[i, heads + kv_heads :, 0])
    written = torch.zeros(b + 1, length, dtype=torch.bool)
    written[torch.arange(b), slots] = True
    assert not kc.transpose(1, 2)[~written].any() and not vc.transpose(1, 2)[~written].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_attention_equals_sdpa(dtype, kv_heads):
    g = torch.Generator().manual_seed(2)
    b, heads, hd, length = 3, 4, 64, 40
    q = torch.randn(b, heads, hd, generator=g).to(dtype)
    kc = torch.randn(b, kv_heads, length + 8, hd, generator=g).to(dtype)
    vc = torch.randn(b, kv_heads, length + 8, hd, generator=g).to(dtype)
    mask = torch.rand(b, length, generator=g) > 0.3
    mask[:, 0] = True
    out = kernels.decode_attention(q, kc, vc, mask, length, hd**-0.5)
    k64, v64 = (t[:, :, :length].double().repeat_interleave(heads // kv_heads, 1) for t in (kc, vc))
    want = F.scaled_dot_product_attention(q.double()[:, :, None], k64, v64, attn_mask=mask[:, None, None])
    want = want[:, :, 0].reshape(b, heads * hd)
    # fp32 sums, rounded once: within the dtype's rounding of the fp64 result
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    one = kernels.decode_attention(q[:1], kc[:1], vc[:1], mask[:1], length, hd**-0.5)
    assert torch.equal(one, out[:1])  # a row does not depend on the rest of the batch
    shared = kernels.decode_attention(q, kc, vc, mask[:1], length, hd**-0.5)  # one mask row for all
    assert torch.equal(shared[:1], out[:1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(4, 2 * 336, generator=g) * 4).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    assert ulps(kernels.silu_mul(gu), F.silu(gate) * up) <= (1 if dtype == torch.bfloat16 else 4)


def decode_logits(model, ids, prompt_len: int, *, shared_positions: bool = False) -> torch.Tensor:
    """Logits of a prompt, then of one token per row at a time with a KV cache (row 0 left-padded by 2)."""
    b, total = ids.shape
    cache = KVCache(model.config.num_hidden_layers, b, total + 4)
    with torch.inference_mode():
        out = [model(ids[:, :prompt_len], kv_cache=cache, cache_positions=torch.arange(prompt_len))[:, -1]]
        for p in range(prompt_len, total):
            mask = torch.ones(b, p + 1, dtype=torch.bool)
            mask[0, :2] = False
            slots = torch.tensor([p]) if shared_positions else torch.full((b, 1), p)
            out.append(
                model(ids[:, p : p + 1], kv_cache=cache, cache_positions=slots, key_padding_mask=mask)[:, -1]
            )
    return torch.stack(out).float()


def eager_copy(model):
    """The prepared model with the model's own blocks and norm back (the same modules otherwise)."""
    other = copy.deepcopy(model)
    for block in other.layers.values():
        block.__class__ = Block
    other.norm.__class__ = RMSNorm
    return other


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_prepared_model_decodes_as_the_model_code(preset, quantize):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    base = Qwen(cfg)
    base.init_weights(std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (3, 14))
    oracle = decode_logits(copy.deepcopy(base), ids, 8)  # fp32, the model's own code
    for dtype in DTYPES if quantize is None else [torch.bfloat16]:
        fast = prepare_for_inference(copy.deepcopy(base).to(dtype), quantize)
        assert "C decode operations" in fast.inference_format
        assert all(type(b) is CPUDecodeBlock for b in fast.layers.values())
        assert type(fast.norm) is CPUDecodeRMSNorm
        eager = eager_copy(fast)
        got, want = decode_logits(fast, ids, 8), decode_logits(eager, ids, 8)
        assert torch.equal(decode_logits(fast, ids, 8, shared_positions=True), got)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        else:  # as close to the fp32 oracle as the eager bf16 model is (plus rounding's spread)
            assert (got - oracle).abs().max() <= 1.25 * (want - oracle).abs().max() + 0.02


def test_forwards_that_keep_the_model_code(monkeypatch):
    """Prompts and forwards with autograd run the model's code; one-token steps under inference_mode the C operations."""
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = prepare_for_inference(Qwen(get_preset("tiny")))
    ids = torch.randint(0, 1000, (2, 6))
    cache = KVCache(model.config.num_hidden_layers, 2, 16)
    with torch.no_grad():
        model(ids, kv_cache=cache, cache_positions=torch.arange(6))
    assert calls == []  # a prompt
    one = dict(kv_cache=cache, cache_positions=torch.full((2, 1), 6))
    model(ids[:, :1], **one)  # gradients enabled: the model's code (the C operations have no backward)
    assert calls == []
    with torch.inference_mode():
        model(ids[:, :1], **one)
    assert len(calls) == model.config.num_hidden_layers


def test_engine_generates_the_tokens_of_the_model_code():
    """Greedy generation through the engine (continuous batching, KV slots) gives the tokens of the model's own
    code in fp32, prompts of different lengths together."""
    from qwen15.generation import Generator
    from qwen15.sampling import SamplingParams

    torch.manual_seed(0)
    cfg = get_preset("tiny-gqa")
    base = Qwen(cfg)
    base.init_weights(std=0.2)  # peaked logits: greedy ties are unlikely
    fast = prepare_for_inference(copy.deepcopy(base))
    eager = eager_copy(fast)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 9, 5)]
    greedy = SamplingParams()
    outs = [
        [
            o.token_ids
            for o in Generator(m, None).generate(
                prompts, max_new_tokens=12, sampling=greedy, stop_token_ids=[]
            )
        ]
        for m in (fast, eager)
    ]
    assert outs[0] == outs[1]


def test_shapes_the_operations_do_not_cover_keep_the_model_code():
    """Widths that are not whole 16-lane vectors (head_dim 48 here) are left to the model's code."""
    cfg = get_preset("tiny").replace(hidden_size=96, num_attention_heads=2, num_key_value_heads=2)
    model = prepare_for_inference(Qwen(cfg))
    assert "C decode operations" not in model.inference_format
    assert all(type(b) is Block for b in model.layers.values())
