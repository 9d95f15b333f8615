"""Weight-only int8 and int4: the products and kernels, greedy agreement, memory, and quantized folders on disk."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qwen15 import Qwen
from qwen15.generation import generate
from qwen15.model_config import get_preset
from qwen15.quantize import Int8Linear, quantize_int8, quantize_rows, weight_nbytes

from conftest import SHARED_TOKENIZER


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
    x the logits' scale; measured <= 1.1e-6 at scale ~1.5; 48 rows: the dense path) and generates its greedy
    tokens."""
    cfg = get_preset(name).replace(vocab_size=1000)
    q = quantize_int8(Qwen.from_config(cfg, seed=0))
    ref = dequantized(Qwen.from_config(cfg, seed=0))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = q(ids), ref(ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (got - Qwen.from_config(cfg, seed=0)(ids)).abs().max().item() > 1e-3  # int8 is really applied
    # decode steps (a few rows) on the AVX-512 kernels also quantize the activations (checked against their own
    # reference in test_kernel_products_equal_the_dequantized_product); the weight-only semantics are torch's path
    for m in q.modules():
        if isinstance(m, Int8Linear):
            m.kernel = False
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
    """Prompts longer than the kernels take (3 x 24 rows here: > AMX_ROWS and >= PREFILL_ROWS) run the plain
    product: bit-identical; the decode steps of generate (2 rows) run our kernels where they build
    (test_dense_decode_kernel_is_the_product_to_rounding): the same greedy tokens here."""
    from qwen15.quantize import PackedLinear, can_pack_for_cpu, pack_for_cpu

    cfg = get_preset(name).replace(vocab_size=1000)
    plain = Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)
    packed = pack_for_cpu(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16))
    if not can_pack_for_cpu(plain):
        pytest.skip("oneDNN is not available in this build")
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(
        packed.layers["0"].mlp.up_proj, PackedLinear
    )
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids), packed(ids))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = generate(plain, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    b = generate(packed, None, prompts, max_new_tokens=16, temperature=0, stop_token_ids=[])
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 15, 16, 17, 24, 33, 64])
@pytest.mark.parametrize(
    "shape, bias",
    [((100, 384), True), ((37, 1000), False), ((5, 64), True), ((48, 384), True), ((80, 1024), False)],
)
def test_dense_decode_kernel_is_the_product_to_rounding(dtype, rows, shape, bias, monkeypatch):
    """PackedLinear at decode rows on our kernels (bf16 on AMX tiles at 2 to AMX_ROWS rows where the CPU has them and
    the widths fit: rows of 16, columns of 32; else AVX-512 dot products below WIDE_FROM rows and broadcasts up to
    WIDE_ROWS): fp32 sums in another order than oneDNN's, so not bit-identical to the plain product; bound against
    an fp64 oracle of the same bf16/fp32 inputs: bf16 within one bf16 rounding of the output (2^-8 relative) plus
    the fp32 summation error, which the plain product (F.linear) meets too; fp32 within 1e-5 of the output's scale.
    Prompts (more rows): bf16 the plain product, bit-identical; fp32 oneDNN's, within the same bound."""
    from qwen15.quantize import PackedLinear, kernels
    from qwen15.quantize.cpu import WIDE_FROM

    if not kernels.dense_kernel(dtype):
        pytest.skip(
            f"no AVX-512 dense kernel for {dtype} here ({kernels.unavailable_reason() or 'no avx512_bf16'})"
        )
    n, k = shape
    g = torch.Generator().manual_seed(rows * 7 + k)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    packed = PackedLinear(lin)
    fits = dtype == torch.bfloat16 and n % 16 == 0 and k % 32 == 0
    assert packed.amx == (fits and kernels.amx_bf16())
    ran = []

    def counted(name):
        run = getattr(kernels, name)
        return lambda *args: ran.append(name) or run(*args)

    for name in ("amx_linear", "dense_linear", "dense_wide_linear"):
        monkeypatch.setattr(kernels, name, counted(name))

    def within_bound(out, x):
        ref = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
        scale = ref.abs().max().item()
        if dtype == torch.float32:
            return (out.double() - ref).abs().max().item() <= 1e-5 * scale
        return ((out.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * scale).all()

    x = torch.randn(1, rows, k, generator=g).to(dtype)
    out, plain = packed(x), F.linear(x, lin.weight, lin.bias)
    if packed.amx and 1 < rows <= kernels.AMX_ROWS:
        expected = "amx_linear"
    else:
        expected = "dense_linear" if rows < WIDE_FROM else "dense_wide_linear"
    assert ran == [expected]
    assert packed.kernel and out.dtype == dtype and out.shape == (1, rows, n)
    assert within_bound(out, x)
    assert within_bound(plain, x)
    long = torch.randn(1, 80, k, generator=g).to(dtype)
    ran.clear()
    out = packed(long)
    assert ran == []
    if dtype == torch.bfloat16:
        assert torch.equal(out, F.linear(long, lin.weight, lin.bias))
    else:
        assert within_bound(out, long)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_wide_kernel_at_any_rows(dtype):
    """dense_wide_linear at every count of 16-row vectors, partial ones and a partial last tile of weight rows;
    more than WIDE_ROWS rows is an error, not a wrong answer."""
    from qwen15.quantize import kernels

    if not kernels.dense_kernel(dtype):
        pytest.skip(f"no AVX-512 dense kernel for {dtype} here")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(29, 96, generator=g).to(dtype)  # 29 rows: no tile size divides it
    bias = torch.randn(29, generator=g)
    for rows in (1, 7, 16, 31, 32, 47, 48, 50, 64):
        x = torch.randn(rows, 96, generator=g).to(dtype)
        ref = x.double() @ w.double().T + bias.double()
        out = kernels.dense_wide_linear(x, w, bias).double()
        tol = 2**-8 * ref.abs() + 1e-5 if dtype == torch.bfloat16 else 1e-5 * ref.abs().max()
        assert ((out - ref).abs() <= tol).all(), rows
    with pytest.raises(ValueError, match="1 to 64 rows"):
        kernels.dense_wide_linear(torch.zeros(65, 96, dtype=dtype), w, None)


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


# ---------------------------------------------------------------------------------------------- int4, kernels


def _kernels_or_skip():
    from qwen15.quantize import kernels

    if kernels.library() is None:
        pytest.skip(f"AVX-512 kernels unavailable: {kernels.unavailable_reason()}")
    return kernels


@pytest.mark.parametrize("k", [1024, 352, 96])
def test_int4_pack_round_trip_and_error_within_half_a_step(k):
    from qwen15.quantize.int4 import dequantize_rows, group_for, pack, quantize_groups, unpack

    w = torch.randn(40, k, generator=torch.Generator().manual_seed(0))
    g = group_for(k, 64)
    assert g == (64 if k % 64 == 0 else 32)
    q, s, m = quantize_groups(w, g)
    assert q.max() <= 15 and s.dtype == torch.bfloat16 and s.shape == (40, k // g)
    packed = pack(q, g)
    assert packed.shape == (40, k // 2) and torch.equal(unpack(packed, g), q)
    deq = dequantize_rows(packed, s, m, torch.float32)
    step = s.float().repeat_interleave(g, dim=1)
    # rounding to the stored (bf16) scale and min: at most half a step, plus what the clamp at the top of the
    # range loses when the bf16 scale rounded down (under 1% of a step over 15 steps)
    assert ((deq - w).abs() <= step * 0.5 + step * 15 * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("k, group", [(1024, 64), (2816, 64), (352, 32), (2816, 128)])
def test_int4_layout_puts_each_column_where_the_kernel_reads_it(k, group):
    """Column c of group g sits in super-block g // 16 (16 groups, the last R = ng - 16 * (g // 16) if fewer), run
    t = s mod S/2 of its step s = (c mod group) // 4 (S = group / 4 steps), bytes 4 * (g mod 16) + c mod 4 of the
    run; steps from S/2 on in the high nibble (the layout cpu_kernels.c reads)."""
    from qwen15.quantize.int4 import pack

    ng, steps = k // group, group // 4
    cols = sorted(
        {0, 3, 4, group - 1, group, (17 * group + 5) % k, k - 1, k - group // 2, (ng // 2) * group + 7}
    )
    for c in cols:
        q = torch.zeros(1, k, dtype=torch.uint8)
        q[0, c] = 9
        g, s = c // group, (c % group) // 4
        sb, r = g // 16, min(16, ng - 16 * (g // 16))
        byte = sb * 8 * group + (s % (steps // 2)) * 4 * r + 4 * (g % 16) + c % 4
        packed = pack(q, group)[0]
        assert packed.nonzero().flatten().tolist() == [byte], c
        assert packed[byte] == (9 << 4 if s >= steps // 2 else 9), c


def quantized_activations(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """What the kernels multiply: each row in blocks of `block` columns (int8: 64; int4: its group) as int8 *
    (max |x| / 127), computed with the same fp32 operations (x * (127 / max), rounded to nearest even), then
    dequantized."""
    blocks = x.float().unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).flatten(-2)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "rows", [1, 2, 3, 4, 8, 20]
)  # 2 x rows; from 8 on past PREFILL_ROWS: dequantize + dense
@pytest.mark.parametrize("shape", [(100, 384), (37, 1024), (9, 2816)])
def test_kernel_products_equal_the_dequantized_product(bits, dtype, rows, shape, group):
    """The decode kernels compute exactly dequant(w) @ quantized activations (up to fp32 summation order); the
    prefill path computes dequant(w) @ x with one dense product."""
    from qwen15.quantize import Int4Linear
    from qwen15.quantize.int8 import PREFILL_ROWS

    _kernels_or_skip()
    n, k = shape
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(k, n, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    q = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin, group)
    assert q.kernel and getattr(q, "group_size", None) == group
    x = torch.randn(2, rows, k, generator=g).to(dtype)
    dense = 2 * rows >= PREFILL_ROWS
    w = q.dequantize(dtype if dense else torch.float32).double()
    xq = quantized_activations(x, 64 if bits == 8 else group)
    ref = (x.double() if dense else xq.double()) @ w.T + lin.bias.double()
    out = q(x)
    assert out.dtype == dtype and out.shape == (2, rows, n)
    # fp32: summation order only; bf16: the output's rounding
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_fallback_equals_the_kernel(bits):
    from qwen15.quantize import Int4Linear

    _kernels_or_skip()
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) * 0.05)
    q = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin)
    x = torch.randn(1, 3, 256, generator=g).to(torch.bfloat16)
    fast = q(x)
    q.kernel = False
    slow = q(x)  # weight-only: the activations are not quantized, so the two differ by that rounding
    assert (fast.float() - slow.float()).abs().max().item() <= 0.03 * slow.float().abs().max().item()


def test_kernels_share_torchs_openmp_runtime():
    """The kernel library needs libgomp.so.1, which must resolve to the runtime torch loaded (one thread pool)."""
    import subprocess
    import sys

    _kernels_or_skip()
    # in a fresh process: other test modules import libraries that bring their own OpenMP (sentencepiece)
    code = (
        "import torch; from qwen15.quantize import kernels; assert kernels.library() is not None;"
        "maps = open('/proc/self/maps').read().splitlines();"
        "import json; print(json.dumps(sorted({l.split()[-1] for l in maps if 'libgomp' in l or 'libiomp' in l})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    runtimes = json.loads(out.stdout)
    assert len(runtimes) == 1, runtimes


def test_without_kernels_the_model_still_runs_and_says_why(tmp_path):
    import subprocess
    import sys

    code = (
        "import torch; from qwen15 import Qwen; from qwen15.model_config import get_preset;"
        "from qwen15.quantize import quantize, describe;"
        "m = quantize(Qwen.from_config(get_preset('tiny').replace(vocab_size=1000), seed=0, dtype=torch.bfloat16),"
        " 'int4'); print(describe(m)); print(bool(torch.isfinite(m(torch.tensor([[1, 2, 3]]))).all()))"
    )
    env = {**__import__("os").environ, "QWEN15_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "disabled by QWEN15_CPU_KERNELS=0" in out.stdout and "torch dequantize" in out.stdout
    assert out.stdout.strip().endswith("True")


@pytest.mark.parametrize("name", ["tiny", "tiny-mha"])
def test_int4_weights_take_under_a_third_of_bf16(name):
    from qwen15.quantize import quantize_int4

    cfg = get_preset(name)
    bf16 = Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)
    before = weight_nbytes(bf16)
    q = quantize_int4(bf16)
    ratio = weight_nbytes(q) / before
    print(f"{name}: int4 weights {ratio:.3f} of bf16")
    assert ratio < 0.33
    if cfg.tie_word_embeddings:
        assert q.lm_head.qweight.data_ptr() == q.embed_tokens.qweight.data_ptr()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_then_fuse_equals_unfused(method):
    from qwen15.fuse import FusedAttention, fuse_projections
    from qwen15.quantize import quantize

    cfg = get_preset("tiny-gqa").replace(vocab_size=1000)
    a = quantize(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16), method)
    b = fuse_projections(quantize(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16), method))
    assert isinstance(b.layers["0"].self_attn, FusedAttention)
    assert type(b.layers["0"].self_attn.qkv_proj) is type(a.layers["0"].self_attn.q_proj)
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, y = a(ids).float(), b(ids).float()
    assert (x - y).abs().max().item() <= 0.02 * x.abs().max().item()
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    ga = generate(a, None, prompts, max_new_tokens=8, temperature=0, stop_token_ids=[])
    gb = generate(b, None, prompts, max_new_tokens=8, temperature=0, stop_token_ids=[])
    assert [r.token_ids[0] for r in ga] == [r.token_ids[0] for r in gb]


def test_describe_names_the_format_and_kernel():
    from qwen15.quantize import describe, kernels, pack_for_cpu, quantize

    cfg = get_preset("tiny").replace(vocab_size=1000)
    bf16 = Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)
    assert describe(bf16) == "bf16 weights"
    if can_pack := torch.backends.mkldnn.is_available():
        packed = describe(pack_for_cpu(Qwen.from_config(cfg, seed=0, dtype=torch.bfloat16)))
        if kernels.amx_bf16():  # the output layer's 1000 rows are not a multiple of 16: AVX-512 there
            assert (
                packed
                == "bf16 weights, AMX (14 of 15 matrices) and AVX-512 kernel for decode, oneDNN for prompts"
            )
        elif kernels.dense_kernel(torch.bfloat16):
            assert packed == "bf16 weights, AVX-512 kernel for decode, oneDNN for prompts"
        else:
            assert packed == "bf16 weights, oneDNN-packed"
    note = describe(quantize(bf16, "int4"))
    assert note.startswith("int4 weights (group 64), output layer int4, bf16 activations")
    # every width (352 columns here: groups of 32 there) runs the kernel
    if kernels.library() is not None:
        assert note.endswith("AVX-512 VNNI kernel"), (note, can_pack)
    else:  # says why the kernel does not run
        assert (
            f"torch dequantize + matmul; AVX-512 kernel unavailable: {kernels.unavailable_reason()}" in note
        )


# ---------------------------------------------------------------------------------------------- on disk


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "bf16"
    Qwen.from_config(
        get_preset("tiny-mha").replace(vocab_size=1000), seed=0, dtype=torch.bfloat16
    ).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_folder_loads_as_saved(tiny_folder, tmp_path, method):
    from qwen15.errors import UserError
    from qwen15.fuse import fuse_projections
    from qwen15.hf_folder import CheckpointError
    from qwen15.model_config import ConfigError
    from qwen15.quantize import load_quantized, quantization_of, quantize
    from qwen15.quantize.saved import quantize_folder

    out = quantize_folder(tiny_folder, tmp_path / method, method, progress=False)
    quant = quantization_of(out)
    assert quant["quant_method"] == "qwen15" and quant["weights"] == method
    loaded = load_quantized(out)
    fresh = quantize(Qwen.from_pretrained(str(tiny_folder), dtype=torch.bfloat16), method)
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), fresh(ids))  # the stored tensors are the quantized ones, bit for bit
    fuse_projections(loaded)
    with torch.no_grad():
        assert torch.isfinite(loaded(ids)).all()
    with pytest.raises(ConfigError, match="load_quantized"):
        Qwen.from_pretrained(str(out))
    with pytest.raises(UserError, match="--overwrite"):
        quantize_folder(tiny_folder, out, method, progress=False)
    with pytest.raises(CheckpointError, match="quantized already"):
        quantize_folder(out, tmp_path / "again", method, progress=False)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prepare_for_inference_quantizes_or_keeps_a_loaded_quantized_model(tiny_folder, tmp_path, method):
    """prepare_for_inference(model, "int8"|"int4") on the bf16 model and prepare_for_inference on the folder
    `convert --quantize` wrote give the same logits bit for bit (per-row/per-group quantization commutes with
    fusing), and a loaded int4 model refuses another quantization."""
    from qwen15 import prepare_for_inference
    from qwen15.errors import UserError
    from qwen15.quantize import load_quantized
    from qwen15.quantize.saved import quantize_folder

    fresh = prepare_for_inference(Qwen.from_pretrained(str(tiny_folder), dtype=torch.bfloat16), method)
    assert fresh.inference_format.startswith(f"fused, {method} weights")
    out = quantize_folder(tiny_folder, tmp_path / method, method, progress=False)
    loaded = prepare_for_inference(load_quantized(out))
    assert loaded.inference_format == fresh.inference_format
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), fresh(ids))
    other = "int8" if method == "int4" else "int4"
    with pytest.raises(UserError, match=f"holds {method} weights already"):
        prepare_for_inference(load_quantized(out), other)
    with pytest.raises(UserError, match="group_size applies to int4 only"):
        prepare_for_inference(Qwen.from_pretrained(str(tiny_folder)), "int8", group_size=32)


def test_convert_quantize_follows_the_output_rule(tiny_folder, tmp_path, capsys):
    """convert --quantize never replaces its input, and replaces only a folder qwen15 wrote (with --overwrite)."""
    from qwen15.cli import main

    assert main(["convert", "--quantize", "int8", "--overwrite", str(tiny_folder), str(tiny_folder)]) == 2
    assert "is this command's input" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["convert", "--quantize", "int8", "--overwrite", str(tiny_folder), str(foreign)]) == 2
    assert "not written by qwen15" in capsys.readouterr().err and (foreign / "notes.txt").is_file()
    out = tmp_path / "q8"
    assert main(["convert", "--quantize", "int8", str(tiny_folder), str(out)]) == 0
    assert (
        main(
            ["convert", "--quantize", "int4", "--group-size", "32", "--overwrite", str(tiny_folder), str(out)]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert (
        main(["convert", "--quantize", "int8", "--group-size", "32", str(tiny_folder), str(tmp_path / "x")])
        == 2
    )
    assert "--group-size applies to --quantize int4 only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "q8"]  # nothing partial left
    assert (tiny_folder / "model.safetensors").is_file() and not (
        tiny_folder / "quantization_config"
    ).exists()


def test_foreign_quantized_checkpoints_are_refused_clearly(tiny_folder, tmp_path):
    import json
    import shutil

    from qwen15.model_config import ConfigError

    folder = tmp_path / "gptq"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'gptq', which qwen15 does not read"):
        Qwen.from_pretrained(str(folder))


def test_cli_convert_quantize_then_generate(tmp_path, capsys):
    import subprocess
    import sys

    from qwen15.cli import main

    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("the shared tokenizer is absent")
    source, out = tmp_path / "bf16", tmp_path / "int4"  # the real vocabulary, so that text prompts fit
    Qwen.from_config(get_preset("tiny"), seed=0, dtype=torch.bfloat16).save_pretrained(str(source))
    assert main(["convert", "--quantize", "int4", str(source), str(out)]) == 0
    assert main(["convert", "--quantize", "int4", str(source), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    gen = ["generate", "--model", str(out), "--tokenizer", str(SHARED_TOKENIZER), "--prompt", "Hi"]
    gen += ["--max-new-tokens", "4", "--threads", "1"]
    assert main(gen + ["--quantize", "int8"]) == 2
    assert "holds int4 weights already" in capsys.readouterr().err
    run = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", *gen], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "int4 weights (group 64)" in run.stderr and "1 threads" in run.stderr


@pytest.mark.parametrize("cc", ["default", "/bin/false"])
def test_kernels_build_into_an_empty_cache_or_fall_back_with_the_reason(tmp_path, cc):
    """A fresh machine: the kernel library is compiled into the (empty) cache folder on first use; a compiler that
    fails leaves the model on torch's kernels, and the reason is in the startup note."""
    import os
    import subprocess
    import sys

    from qwen15.quantize import kernels

    code = (
        "import torch; from qwen15 import Qwen; from qwen15.model_config import get_preset;"
        "from qwen15.quantize import quantize, describe;"
        "m = quantize(Qwen.from_config(get_preset('tiny-mha').replace(vocab_size=1000), seed=0, dtype=torch.bfloat16),"
        " 'int8'); m(torch.tensor([[1, 2, 3]])); print(describe(m))"
    )
    env = {**os.environ, "QWEN15_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("QWEN15_CPU_KERNELS", None)
    if cc != "default":
        env["CC"] = cc
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    built = list((tmp_path / "cache").glob("qwen15_cpu_*.so")) if (tmp_path / "cache").is_dir() else []
    if cc != "default":
        assert "building the kernels failed" in out.stdout and not built
    elif kernels.library() is not None:  # this machine can run them: a fresh cache must get them too
        assert "AVX-512 VNNI kernel" in out.stdout and len(built) == 1
        assert not list((tmp_path / "cache").glob("*.partial"))


@pytest.mark.parametrize("rows", [2, 65, 130])
def test_amx_kernel_at_any_rows(rows):
    """kernels.amx_linear itself (panels of 64 rows over the same weight rows, a zero-padded last block) within
    the bound of test_dense_decode_kernel_is_the_product_to_rounding, beyond the rows PackedLinear gives it."""
    from qwen15.quantize import kernels

    if not kernels.dense_kernel(torch.bfloat16) or not kernels.amx_bf16():
        pytest.skip(
            f"no AMX bf16 kernel here ({kernels.unavailable_reason() or 'QWEN15_AMX=0, or no AMX tiles or compiler support'})"
        )
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 384, generator=g).bfloat16()
    w = torch.randn(96, 384, generator=g).bfloat16()
    bias = torch.randn(96, generator=g)
    out = kernels.amx_linear(x, w, bias)
    ref = x.double() @ w.double().T + bias.double()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    assert ((out.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * ref.abs().max()).all()
