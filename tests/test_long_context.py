"""Long context against transformers' Qwen2ForCausalLM (fp32, random weights, tiny shapes): positions offset to
~30k (the recipes train at 4k-32k), a real 4096-token sequence, packed documents whose positions restart in a
long row, and the KV-cache path (prefill + one-token decode) at a long offset and after a 2k-token prompt.

Bound: 1e-5 on logits of magnitude ~1.5, from the measured differences (printed with -s): 0 for the plain forward
(the same kernels), <= 1.1e-6 for packed rows and the cache path (other attention masks, other summation orders).
"""

from __future__ import annotations

import pytest
import torch

from qwen15 import KVCache
from qwen15.model_config import get_preset

from conftest import load_into_ours, random_hf_model

pytest.importorskip("transformers")

VOCAB = 1000
BOUND = 1e-5
FAMILIES = ["tiny", "tiny-mha", "tiny-gqa"]  # tied MHA head_dim 64, untied MHA, GQA 4/2


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    cfg = get_preset(request.param).replace(vocab_size=VOCAB)
    hf = random_hf_model(cfg, seed=7)
    return hf, load_into_ours(hf, cfg)


def _ids(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _diff(name, got, ref) -> float:
    d = (got - ref).abs().max().item()
    print(f"{name}: max |ours - transformers| {d:.2e} (logits up to {ref.abs().max().item():.1f})")
    return d


@torch.no_grad()
def test_logits_at_positions_offset_to_30k(pair):
    """Contiguous positions from 29000 and up to 32767 (rotary angles of ~3e4 radians in fp32), and positions
    spread 500 apart (0 .. 31500: relative distances up to 31500, which a shift of contiguous positions never
    tests: RoPE depends only on the distance between two positions)."""
    hf, ours = pair
    ids = _ids(3, 64)
    positions = torch.stack([29000 + torch.arange(64), 32768 - 64 + torch.arange(64), 500 * torch.arange(64)])
    ref = hf(input_ids=ids, position_ids=positions).logits
    got = ours(ids, position_ids=positions)
    assert _diff("positions 29000.., 32704..32767, 0..31500 by 500", got, ref) <= BOUND
    assert (ours(ids[2:]) - got[2:]).abs().max().item() > 100 * BOUND  # the spread positions do matter


@torch.no_grad()
def test_logits_of_a_4096_token_sequence(pair):
    hf, ours = pair
    ids = _ids(1, 4096, seed=1)
    assert _diff("4096 tokens", ours(ids), hf(input_ids=ids).logits) <= BOUND


@torch.no_grad()
def test_packed_long_row_equals_each_document_alone(pair):
    """One 3000-token row of 4 documents (document ids; positions restart at each): every document's logits are
    transformers' logits of that document run alone."""
    hf, ours = pair
    lengths = [1100, 37, 1500, 363]
    ids = _ids(1, sum(lengths), seed=2)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    got = ours(ids, document_ids=doc_ids)
    start = 0
    for n in lengths:
        ref = hf(input_ids=ids[:, start : start + n]).logits
        assert _diff(f"document of {n} at {start}", got[:, start : start + n], ref) <= BOUND
        start += n


@torch.no_grad()
def test_kv_cache_decode_at_a_long_offset(pair):
    """Prefill 48 tokens at positions 30000.., then 16 one-token steps through the cache: each step's logits are
    those of transformers' full forward of the whole sequence at the same positions (no cache on its side)."""
    hf, ours = pair
    prompt, steps, offset = 48, 16, 30000
    ids = _ids(1, prompt + steps, seed=3)
    positions = offset + torch.arange(prompt + steps)[None]
    ref = hf(input_ids=ids, position_ids=positions).logits
    cache = KVCache(len(ours.layers), 1, prompt + steps)
    got = [
        ours(
            ids[:, :prompt],
            position_ids=positions[:, :prompt],
            kv_cache=cache,
            cache_positions=torch.arange(prompt),
        )
    ]
    for i in range(prompt, prompt + steps):
        slot = torch.tensor([i])
        got.append(
            ours(
                ids[:, i : i + 1], position_ids=positions[:, i : i + 1], kv_cache=cache, cache_positions=slot
            )
        )
    assert _diff("prefill + 16 cached steps at 30000", torch.cat(got, dim=1), ref) <= BOUND


def test_generate_after_a_2048_token_prompt_equals_transformers(pair):
    """The engine's own cache path (qwen15.generation: prefill of the long prompt, then decode) against
    transformers' generate: the same 12 greedy tokens, for two prompts of different lengths (left padding)."""
    from qwen15.generation import generate

    hf, ours = pair
    prompts = [_ids(2048, seed=4).tolist(), _ids(1500, seed=5).tolist()]
    outs = generate(ours, None, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert [o.token_ids for o in outs] == ref[:, width:].tolist()
