"""Sampling processors against transformers' LogitsProcessor classes on the same logits, and seeded picks."""

from __future__ import annotations

import pytest
import torch

from qwen15.sampling import SamplingError, SamplingParams, pick, probabilities, process_logits

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def reference(params: SamplingParams, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """transformers' processors, in the order generate() builds them, then softmax."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
    if not params.greedy:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=params.top_p))
    return torch.softmax(procs(input_ids, logits.clone()), dim=-1)


def seen_mask(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool)
    return seen.scatter_(1, input_ids, True)


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1),  # Qwen1.5-Chat's settings
    SamplingParams(temperature=1.3, top_k=5, top_p=0.5, repetition_penalty=0.8),
    SamplingParams(temperature=0.0, repetition_penalty=1.2),  # greedy with a penalty
]


@pytest.mark.parametrize("params", CASES, ids=repr)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_probabilities_equal_transformers(params, ties):
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    logits = torch.randn(4, vocab, generator=g) * 3
    if ties:  # coarse values: many exact ties at the top-k and top-p boundaries
        logits = torch.round(logits)
    input_ids = torch.randint(0, vocab, (4, 30), generator=g)
    ours = probabilities(logits, params, seen_mask(input_ids, vocab))
    ref = reference(params, input_ids, logits)
    assert torch.equal(ours, ref)


def test_top_k_and_top_p_keep_what_they_should():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()
    # top_p smaller than the largest probability still keeps the best token
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert probs[0, 0] == 1.0


def test_repetition_penalty_direction():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pick(logits, SamplingParams()), logits.argmax(-1))


def test_same_seed_same_sample_other_seed_other_sample():
    logits = torch.zeros(8, 5000)  # uniform: draws differ between seeds with near certainty
    params = SamplingParams(temperature=1.0)

    def draw(seed):
        return pick(logits, params, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_sample_matches_transformers_multinomial_on_same_seed():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 300, generator=g)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    ours = pick(logits, params, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    ref = torch.multinomial(reference(params, torch.zeros(2, 1, dtype=torch.long), logits), 1).squeeze(1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_bad_settings_are_named(kwargs, word):
    with pytest.raises(SamplingError, match=word):
        SamplingParams(**kwargs)
