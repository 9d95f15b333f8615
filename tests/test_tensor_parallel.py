"""Tensor parallelism against one process: logits (plain and packed documents), the vocab-parallel loss and its
gradients, training steps, greedy decoding with left padding and the KV cache, the inference engine on a split
model; 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parallel_harness import (
    CONFIGS,
    NEW_TOKENS,
    PADS,
    PROMPT,
    STEPS,
    TRAIN_RUNS_2,
    TRAIN_RUNS_4,
    assert_close_params,
    batch,
    deterministic_oracles,  # noqa: F401 (autouse)
    generate_prompts,
    greedy,
    model_for,
    reference_training,
)


def _reference_forward(name):
    model = model_for(CONFIGS[name])
    b0, b1 = batch(0, documents=True), batch(1)
    with torch.no_grad():
        logits = model(b0["input_ids"])
        packed = model(b0["input_ids"], document_ids=b0["document_ids"])
    loss = F.cross_entropy(model(b1["input_ids"]).flatten(0, 1), b1["labels"].flatten(), ignore_index=-100)
    loss.backward()
    return logits, packed, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_tensor_parallel_logits_match_one_process(tp_results):
    for name in CONFIGS:
        ref, ref_packed, _, _ = _reference_forward(name)
        for out in tp_results:
            got = out["forward"]
            for sp in (True, False):
                assert (
                    "Shard(dim=2)" in got[f"{name}/sp={sp}/split"]
                )  # the logits stay split over the vocabulary
                assert (got[f"{name}/sp={sp}/logits"] - ref).abs().max().item() <= 2e-5, (name, sp)
                assert (got[f"{name}/sp={sp}/packed"] - ref_packed).abs().max().item() <= 2e-5, (name, sp)
                assert (got[f"{name}/sp={sp}/last"] - ref[:, -1:]).abs().max().item() <= 2e-5, (name, sp)
    ref = _reference_forward("mha")[0]
    for out in tp_results:
        assert (out["forward"]["mha/replicated-vocab/logits"] - ref).abs().max().item() <= 2e-5


def test_vocab_parallel_loss_and_gradients_match_one_process(tp_results):
    for name in CONFIGS:
        _, _, ref_loss, ref_grads = _reference_forward(name)
        for out in tp_results:
            got = out["forward"]
            assert got[f"{name}/loss"].item() == pytest.approx(ref_loss, abs=1e-5)
            for n, g in ref_grads.items():
                assert (got[f"{name}/grads"][n] - g).abs().max().item() <= 1e-5, (name, n)


def test_fewer_kv_heads_than_ranks_is_refused(two, four):
    assert two[0]["refusal"] == ""  # 2 kv heads over 2 ranks: one each
    assert "num_key_value_heads 2 is not divisible by tp" in four[0]["refusal"]


def test_tensor_parallel_training_matches_one_process(tp_results):
    runs = TRAIN_RUNS_2 if len(tp_results) == 2 else TRAIN_RUNS_4
    for name, optimizer in runs:
        ref_losses, ref_params = reference_training(CONFIGS[name], STEPS, optimizer)
        for out in tp_results:
            got = out["train"][f"{name}/{optimizer}"]
            assert got["losses"] == pytest.approx(ref_losses, abs=2e-5), name
            # AdamW turns a gradient that is zero in exact arithmetic (the k bias: softmax ignores a constant
            # shift) into +-lr steps from rounding noise, so its weights are compared more loosely.
            assert_close_params(got["params"], ref_params, atol=2e-5 if optimizer == "sgd" else 4e-3)


def test_tensor_parallel_greedy_decoding_matches_one_process(two):
    for name in ("tied", "gqa"):
        model = model_for(CONFIGS[name]).eval()
        with torch.no_grad():
            ref, _ = greedy(model, PROMPT, NEW_TOKENS)
            ref_padded, _ = greedy(model, PROMPT, NEW_TOKENS, pads=PADS)
        for out in two:
            got = out["inference"]
            assert torch.equal(got[f"{name}/tokens"], ref), name
            assert torch.equal(got[f"{name}/padded"], ref_padded), name
            local_heads = CONFIGS[name].num_key_value_heads // 2
            assert got[f"{name}/cache_heads"] == got[f"{name}/local_kv_heads"] == local_heads


def test_generate_on_a_tensor_parallel_model(two):
    """qwen15.generation's own loop (its preallocated cache of local_kv_heads heads) on a model split over 2
    ranks gives the single-process greedy tokens; an exception in a worker fails the test with its traceback."""
    from qwen15.generation import generate

    for name in ("tied", "gqa"):
        model = model_for(CONFIGS[name]).eval()
        want = generate(
            model, None, generate_prompts(), max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[]
        )
        for rank, out in enumerate(two):
            got = out["inference"]
            if f"{name}/generate_error" in got:
                pytest.fail(f"generate on rank {rank} ({name}) raised:\n{got[f'{name}/generate_error']}")
            assert got[f"{name}/generate"] == [c.token_ids for c in want], (name, rank)
