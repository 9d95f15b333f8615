"""Sampling for a batch whose rows each have their own settings, seed and repetition history.

Rows with the same SamplingParams are processed together by qwen15.sampling (transformers' processors and
arithmetic, row by row, so a row's probabilities are those it would get alone); each seeded row draws from its
own torch.Generator, so a request's tokens do not depend on what else is in the batch. Log-probabilities, when
asked, are those of the model's distribution (log-softmax of the raw logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen15.sampling import SamplingParams, process_logits

MAX_LOGPROBS = 20


@dataclass
class Picked:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probabilities


class RowState:
    """What sampling keeps per sequence: its settings, generator, and the ids it has seen (for the penalty)."""

    def __init__(
        self,
        params: SamplingParams,
        seed: int | None,
        logprobs: int | None,
        tokens: list[int],
        vocab: int,
        device,
    ):
        self.params = params
        self.logprobs = logprobs
        self.generator = None
        if seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(tokens, dtype=torch.long, device=device)] = True

    def saw(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True


def sample(logits: torch.Tensor, rows: list[RowState], valid_vocab: int) -> list[Picked]:
    """One token per row of logits [n, vocab] (fp32; modified in place: ids >= valid_vocab are never picked)."""
    if valid_vocab < logits.shape[-1]:
        logits[:, valid_vocab:] = -float("inf")
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    groups: dict[SamplingParams, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.params, []).append(i)
    for params, idx in groups.items():
        sel = torch.tensor(idx, device=logits.device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.stack([rows[i].seen for i in idx])
        scores = process_logits(logits.index_select(0, sel), params, seen)
        if params.greedy:
            tokens[sel] = scores.argmax(dim=-1)
            continue
        probs = torch.softmax(scores, dim=-1)
        shared = [j for j, i in enumerate(idx) if rows[i].generator is None]
        if shared:  # unseeded rows: torch's global generator, one draw for all of them
            pick = torch.multinomial(probs[shared], num_samples=1).squeeze(1)
            tokens[sel[shared]] = pick
        for j, i in enumerate(idx):
            if rows[i].generator is not None:
                tokens[idx[j]] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0]
    out = [Picked(t) for t in tokens.tolist()]
    want = [i for i, row in enumerate(rows) if row.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)
        chosen = logp.gather(1, tokens[want][:, None])[:, 0].tolist()
        k = max(rows[i].logprobs for i in want)
        top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
        for j, i in enumerate(want):
            out[i].logprob = chosen[j]
            n = rows[i].logprobs
            out[i].top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else []
    for row, p in zip(rows, out):
        row.saw(p.token)
    return out
