"""Sampling: the logits processors of transformers' `generate` (same order, same arithmetic) and the token pick.

Order, as transformers applies them: repetition penalty, then (sampling only) temperature, top-k, top-p; the pick
is argmax when temperature is 0, else one multinomial draw from softmax of the processed scores. Every step works
on fp32 logits [batch, vocab], so probabilities match transformers' to the last bit on the same logits.

Differences from transformers, on purpose:
- the repetition penalty counts only real tokens of each row (prompt and generated), never the left padding of a
  batch (transformers penalises the pad id too, which for Qwen is <|endoftext|>, a stop token);
- ids beyond the tokenizer (embedding padding rows) are masked to -inf before any processor, so they can never be
  picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen15.errors import UserError


class SamplingError(UserError):
    """Sampling settings out of range; the message names the setting and its valid range."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters; repetition_penalty 1.0 disables it."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of tokens already seen (bool mask [batch, vocab]) divided by penalty if positive, else multiplied."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k highest scores (and every score tied with the k-th), -inf elsewhere."""
    top_k = min(top_k, scores.size(-1))
    kth = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose cumulative probability is at most 1 - top_p; the most
    likely token always stays."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The processed scores [batch, vocab] (fp32) that the pick works on."""
    scores = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if params.greedy:
        return scores
    if params.temperature != 1.0:
        scores = apply_temperature(scores, params.temperature)
    if params.top_k:
        scores = apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p)
    return scores


def probabilities(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The distribution a sampling step draws from (softmax of the processed scores)."""
    return torch.softmax(process_logits(logits, params, seen), dim=-1)


def pick(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]."""
    scores = process_logits(logits, params, seen)
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
