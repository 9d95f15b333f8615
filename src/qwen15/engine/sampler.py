"""Sampling for a batch whose rows each have their own settings, seed and repetition history.

Rows with the same SamplingParams are processed together by qwen15.sampling (transformers' processors and
arithmetic, row by row, so a row's probabilities are those it would get alone); each seeded row draws from its
own torch.Generator, so a request's tokens do not depend on what else is in the batch. Log-probabilities, when
asked, are those of the model's distribution (log-softmax of the raw logits), as OpenAI and vLLM report them.
Everything stays on the logits' device (no host sync): the engine reads the picks back when it chooses to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen15.quantize import kernels
from qwen15.sampling import SamplingParams, process_logits

MAX_LOGPROBS = 20


@dataclass
class Picks:
    """One step's picks, on the device. tokens [n]; with logprobs asked by some rows (`want`, their row indices):
    chosen [len(want)] the log-probability of each one's token, top_ids/top_logprobs [len(want), k]."""

    tokens: torch.Tensor
    want: list[int]
    chosen: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


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

    def saw(self, token: torch.Tensor) -> None:
        """token: a one-element id tensor on the device."""
        if self.seen is not None:
            self.seen.index_fill_(0, token, True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (first maximum; NaN counts as the largest): on CPU our kernel, which reads the rows at
    the memory's speed in any float dtype (torch's argmax is single-threaded there)."""
    cpu = logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32)
    if cpu and logits.shape[-1] and logits.stride(-1) == 1 and kernels.library() is not None:
        return kernels.argmax(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, rows: list[RowState], valid_vocab: int) -> Picks:
    """One token per row of logits [n, vocab] (the model's dtype or fp32; ids >= valid_vocab are never picked).
    Sampling and log-probabilities work on fp32 logits (a copy, or the tensor itself, modified in place)."""
    groups: dict[SamplingParams, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.params, []).append(i)
    if len(groups) == 1 and next(iter(groups)).greedy and rows[0].seen is None:
        tokens = greedy(logits[:, :valid_vocab])  # the common case: one greedy group, no copy of the logits
    else:
        logits = _fp32(logits, valid_vocab)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for params, idx in groups.items():
            whole = len(idx) == len(rows)
            sel = None if whole else torch.tensor(idx, device=logits.device)
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.stack([rows[i].seen for i in idx])
            scores = process_logits(logits if whole else logits.index_select(0, sel), params, seen)
            if params.greedy:
                picked = greedy(scores)
            else:
                probs = torch.softmax(scores, dim=-1)
                picked = torch.empty(len(idx), dtype=torch.long, device=logits.device)
                shared = [j for j, i in enumerate(idx) if rows[i].generator is None]
                if shared:  # unseeded rows: torch's global generator, one draw for all of them
                    picked[shared] = torch.multinomial(probs[shared], num_samples=1).squeeze(1)
                for j, i in enumerate(idx):
                    if rows[i].generator is not None:
                        picked[j] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0]
            if whole:
                tokens = picked
            else:
                tokens[sel] = picked
    for i, row in enumerate(rows):
        row.saw(tokens[i : i + 1])
    want = [i for i, row in enumerate(rows) if row.logprobs is not None]
    picks = Picks(tokens, want)
    if want:
        logp = torch.log_softmax(_fp32(logits[want], valid_vocab), dim=-1)
        picks.chosen = logp.gather(1, tokens[want][:, None])[:, 0]
        k = max(rows[i].logprobs for i in want)
        if k:
            picks.top_logprobs, picks.top_ids = logp.topk(k, dim=-1)
    return picks


def _fp32(logits: torch.Tensor, valid_vocab: int) -> torch.Tensor:
    """The logits in fp32 with ids >= valid_vocab at -inf (in place when they are fp32 already)."""
    logits = logits.float()
    if valid_vocab < logits.shape[-1]:
        logits[:, valid_vocab:] = -float("inf")
    return logits
