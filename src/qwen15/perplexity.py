"""Perplexity of a token stream with the sliding-window method of transformers' perplexity guide.

Windows of `seq_length` tokens start every `stride` tokens; each window scores only the tokens the previous
window did not (its last `end - previous_end` tokens), with everything before them in the window as context. So
every token but the very first is scored exactly once, with at least `seq_length - stride` tokens of context once
the first window is past (with stride == seq_length the windows do not overlap and each window's first token has
no context, so it is not scored). perplexity = exp(sum of negative log-likelihoods / number of scored tokens).

The guide multiplies each window's mean loss by (scored tokens - 1), a small miscount; here each token's
negative log-likelihood is summed exactly, and the count printed is the number of tokens scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwen15.errors import UserError


class PerplexityError(UserError):
    """Settings or data that cannot give a perplexity; the message says which and what to do."""


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored


def _exp(x: float) -> float:
    """e**x, infinite beyond float range (a model far off the text has a perplexity too large to print)."""
    return math.exp(x) if x < 709.0 else math.inf


def windows(num_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, number of scored tokens at the end of the window) for each window."""
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_length, num_tokens)
        # the window's first token has no context in it (the text's first token, or every window's first when
        # stride == seq_length, as in the guide)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == num_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(
    model,
    token_ids: list[int] | torch.Tensor,
    *,
    seq_length: int = 1024,
    stride: int = 512,
    chunk: int = 256,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `token_ids` under `model` (sliding windows of seq_length, moved by stride).

    The output layer runs on `chunk` positions at a time, in fp32 log-softmax, so memory stays small even with a
    152k vocabulary and long windows.
    """
    if seq_length < 2:
        raise PerplexityError(f"--seq-length must be at least 2, got {seq_length}")
    if not 1 <= stride <= seq_length:
        raise PerplexityError(f"--stride must be between 1 and --seq-length ({seq_length}), got {stride}")
    if seq_length > model.config.max_position_embeddings:
        raise PerplexityError(
            f"--seq-length {seq_length} exceeds the model's context window "
            f"({model.config.max_position_embeddings}); lower it"
        )
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise PerplexityError(f"the text has {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    ids = ids.to(device)
    plan = windows(ids.numel(), seq_length, stride)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s for _, _, s in plan), unit="tok", desc="perplexity", dynamic_ncols=True)
    nll_sum, scored_total = 0.0, 0
    for begin, end, scored in plan:
        window = ids[begin:end][None]
        hidden = model(window, return_hidden=True)[0]  # [L, hidden]
        first = hidden.shape[0] - scored  # positions first-1 .. L-2 predict tokens first .. L-1
        for start in range(first, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            logits = model.lm_head(hidden[start - 1 : stop - 1]).float()
            targets = window[0, start:stop]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            nll_sum += float(nll)
        scored_total += scored
        if bar is not None:
            bar.update(scored)
            bar.set_postfix(ppl=f"{_exp(nll_sum / scored_total):.3f}")
    if bar is not None:
        bar.close()
    return PerplexityResult(_exp(nll_sum / scored_total), nll_sum, scored_total, len(plan))
