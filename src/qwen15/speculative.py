"""Speculative decoding: a small draft model proposes k tokens, the target checks them all in one forward.

    from qwen15.speculative import speculative_generate
    out = speculative_generate(target, draft, tokenizer, "The capital of France is", max_new_tokens=64, k=4)
    out.text, out.token_ids, out.acceptance_rate, out.target_forwards

Each round the draft runs k one-token steps over its own KV cache, then the target runs once over the tokens its
cache lacks plus the k drafts, which gives its distribution at all k+1 positions. Draft token i is kept with
probability min(1, p_i(x)/q_i(x)) (p: target, q: draft, both after the same repetition penalty, temperature,
top-k and top-p); at the first rejection the round's last token is drawn from normalize(max(0, p_i - q_i)), and
when all k are kept a bonus token comes from p_{k+1}. The tokens so produced follow the target's own sampling
distribution exactly (Leviathan et al. 2023, Chen et al. 2023); greedy (temperature 0) keeps drafts while they
equal the target's argmax, so the tokens are those of plain greedy decoding of the target. Rejected positions
are rolled back by moving each cache's fill pointer: their slots are overwritten before any query reads them.
Greedy equality is exact in fp32 on CPU (asserted in tests); the target scores a position inside a (k+1)-token
forward instead of a one-token step, which kernels may round differently in the last bit, so in bf16 a near-tie
can go the other way, as between prefill and decode.

The repetition penalty at position i counts the prompt, the tokens generated before the round and drafts 1..i-1,
i.e. exactly the tokens that precede position i if it is reached, for p and q alike; so it keeps the
distribution too. One prompt at a time (batch 1), the case speculative decoding is for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qwen15.errors import UserError
from qwen15.generation import (
    Completion,
    GenerationError,
    Prompt,
    TextStream,
    default_stop_ids,
    resolve_sampling,
)
from qwen15.model import KVCache, Qwen
from qwen15.output_text import OutputText
from qwen15.sampling import SamplingParams, probabilities, process_logits


class DraftModelError(UserError):
    """A draft model that cannot draft for this target (another vocabulary, another device) or a bad k."""


@dataclass
class SpeculativeCompletion(Completion):
    """A Completion plus what the drafting did: draft tokens proposed and kept by the target's check, target and
    draft forward passes. Drafts are counted as checked, before a stop cut the round short."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


# ---------------------------------------------------------------------------------------------- the check


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection step, for a batch of rounds: p [B, k+1, V] target probabilities, q [B, k, V] draft
    probabilities, drafts [B, k] drawn from q. Returns (drafts kept [B], the token that follows them [B])."""
    b, k = drafts.shape
    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(b, k, generator=generator, device=p.device, dtype=p.dtype)
    kept = (u * q_x < p_x).long().cumprod(dim=-1).sum(dim=-1)  # u < p/q without dividing by q
    # At the first rejection: max(0, p - q); after k kept drafts q counts as 0, so this is p itself (the bonus).
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)
    at = kept[:, None, None].expand(-1, 1, p.shape[-1])
    p_at, q_at = p.gather(1, at).squeeze(1), q_ext.gather(1, at).squeeze(1)
    residual = (p_at - q_at).clamp(min=0)
    # p == q to the last bit never rejects (u * q < q); the fallback only guards against rounding leaving no mass
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
    return kept, torch.multinomial(residual, 1, generator=generator).squeeze(1)


def accept_greedy(target_best: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy check: target_best [B, k+1] argmax tokens of the target, drafts [B, k]. Drafts are kept while they
    equal the target's choice; the next token is the target's choice after them."""
    k = drafts.shape[1]
    kept = (drafts == target_best[:, :k]).long().cumprod(dim=-1).sum(dim=-1)
    return kept, target_best.gather(1, kept[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------- the loop


def _logits(model: Qwen, cache: KVCache, tokens: torch.Tensor, start: int, last: int) -> torch.Tensor:
    """Feed tokens [s] at cache slots start.. (positions = slots, no padding); fp32 logits of the last `last`
    positions [last, V] (the output layer runs only on those)."""
    end = start + tokens.numel()
    dev = tokens.device
    hidden = model(
        tokens[None],
        kv_cache=cache,
        cache_positions=torch.arange(start, end, device=dev),
        key_padding_mask=torch.ones(1, end, dtype=torch.bool, device=dev),
        return_hidden=True,
    )
    return model.lm_head(hidden[:, -last:])[0].float()


def check_draft(target: Qwen, draft: Qwen, tokenizer, k: int) -> int:
    """The vocabulary both models are scored over: the tokenizer's ids when given (Qwen1.5 sizes pad their
    embeddings to 151936 or 152064 rows over the same 151646 tokens), else every row, which must then agree."""
    if not isinstance(k, int) or k < 1:
        raise DraftModelError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    t_dev, d_dev = next(target.parameters()).device, next(draft.parameters()).device
    if t_dev != d_dev:
        raise DraftModelError(
            f"the draft model is on {d_dev} but the target on {t_dev}; load both on one device"
        )
    if tokenizer is not None and len(tokenizer) <= min(tv, dv):
        return len(tokenizer)
    if tv != dv:
        extra = f" and the tokenizer has {len(tokenizer)} tokens" if tokenizer is not None else ""
        raise DraftModelError(
            f"the draft model's vocabulary has {dv} rows but the target's {tv}{extra}: speculative decoding needs "
            "one tokenizer for both; pick a draft of the same model family (every Qwen1.5 size shares one)"
        )
    return tv


def _prompt_ids(prompt: Prompt, tokenizer, vocab: int, context: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise GenerationError("the prompt is empty; give at least one token")
    if len(ids) >= context:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens but the context window is {context}; shorten it"
        )
    if max(ids) >= vocab or min(ids) < 0:
        raise GenerationError(f"the prompt has a token id outside the vocabulary [0, {vocab})")
    return ids


def _propose(
    draft: Qwen,
    cache: KVCache,
    ids: torch.Tensor,
    filled: int,
    kr: int,
    vocab: int,
    sampling: SamplingParams,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kr draft tokens [kr] and the draft's probabilities they were drawn from [kr, vocab] (empty when greedy).
    The first step feeds the ids the draft's cache lacks (ids[filled:]), each later step the previous draft."""
    tokens, q = [], []
    for i in range(kr):
        fed = ids[filled:] if i == 0 else tokens[-1]
        logits = _logits(draft, cache, fed, filled if i == 0 else ids.numel() + i - 1, 1)[:, :vocab]
        if sampling.greedy:
            tok = process_logits(logits, sampling, seen).argmax(-1)
        else:
            q.append(probabilities(logits, sampling, seen)[0])
            tok = torch.multinomial(q[-1], 1, generator=generator)
        tokens.append(tok.view(1))
        if seen is not None:  # the next draft's penalty counts this one
            seen = seen.clone()
            seen[0, tok] = True
    empty = ids.new_zeros(0)
    block = torch.cat(tokens) if tokens else empty
    return block, torch.stack(q) if q else torch.zeros(kr, vocab, device=ids.device)


def _stream(
    target: Qwen,
    draft: Qwen,
    tokenizer,
    prompt: Prompt,
    *,
    k: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop: Sequence[str] | None,
    stop_token_ids: Sequence[int] | None,
    seed: int | None,
) -> Iterator[tuple[int, str]]:
    """Yields (0, text delta) as rounds finish; returns [SpeculativeCompletion] (the shape TextStream reads)."""
    vocab = check_draft(target, draft, tokenizer, k)
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stops = tuple(s for s in (stop or ()) if s)
    if stops and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer")
    if stop_token_ids is None:
        stop_token_ids = default_stop_ids(target, tokenizer)
    context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    ids = _prompt_ids(prompt, tokenizer, min(target.config.vocab_size, draft.config.vocab_size), context)
    budget = min(max_new_tokens, context - len(ids))
    target.eval()
    draft.eval()
    dev = next(target.parameters()).device
    row = OutputText(tokenizer, stops)
    stop_ids = frozenset(int(i) for i in stop_token_ids)
    t_cache = KVCache(target.config.num_hidden_layers, 1, len(ids) + budget)
    d_cache = KVCache(draft.config.num_hidden_layers, 1, len(ids) + budget)
    t_filled = d_filled = 0  # cache slots holding keys of ids[:filled]; the rest is stale or empty
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    seen = None  # ids the repetition penalty counts (ids beyond `vocab` are padding rows: never sampled)
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, vocab, dtype=torch.bool, device=dev)
        seen[0, torch.tensor([i for i in ids if i < vocab], dtype=torch.long, device=dev)] = True
    proposed = accepted = target_forwards = draft_forwards = 0

    with torch.inference_mode():
        all_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        while row.finish is None:
            n = all_ids.numel()
            kr = min(k, budget - len(row.ids) - 1)  # never draft past the budget
            block, q = _propose(draft, d_cache, all_ids, d_filled, kr, vocab, sampling, seen, generator)
            draft_forwards += kr
            if kr:
                d_filled = n + kr - 1
            logits = _logits(target, t_cache, torch.cat([all_ids[t_filled:], block]), t_filled, kr + 1)
            logits = logits[:, :vocab]
            target_forwards += 1
            seen_at = None  # position i of the round is preceded by drafts 0..i-1
            if seen is not None:
                hits = torch.zeros(kr + 1, vocab, dtype=torch.long, device=dev)
                hits[torch.arange(1, kr + 1, device=dev), block] = 1
                seen_at = seen | (hits.cumsum(0) > 0)
            if sampling.greedy:
                best = process_logits(logits, sampling, seen_at).argmax(-1)
                kept, nxt = accept_greedy(best[None], block[None])
            else:
                p = probabilities(logits, sampling, seen_at)
                kept, nxt = accept_drafts(p[None], q[None], block[None], generator)
            kept_n = int(kept)
            new = torch.cat([block[:kept_n], nxt])
            proposed, accepted = proposed + kr, accepted + kept_n
            t_filled = n + kept_n  # the target saw every draft; keep the kept ones
            d_filled = min(d_filled, n + kept_n)  # the draft saw drafts 0..kr-2
            all_ids = torch.cat([all_ids, new])
            if seen is not None:
                seen = seen.clone()
                seen[0, new] = True
            for tok in new.tolist():
                if tok in stop_ids:  # a stop id ends the row and is left out
                    row.end("stop", tok)
                    break
                row.add(tok)
                if row.finish is None and len(row.ids) >= budget:
                    row.end("length")
                if row.finish is not None:
                    break
            delta = row.delta()
            if delta:
                yield 0, delta
    return [
        SpeculativeCompletion(
            row.ids,
            row.text,
            row.finish or "length",
            len(ids),
            row.stop,
            proposed=proposed,
            accepted=accepted,
            target_forwards=target_forwards,
            draft_forwards=draft_forwards,
        )
    ]


def speculative_stream(
    target: Qwen,
    draft: Qwen,
    tokenizer,
    prompt: Prompt,
    *,
    k: int = 4,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> TextStream:
    """Like `speculative_generate`, streaming text deltas: `for delta in stream: ...`; then `stream.completion`
    is the SpeculativeCompletion."""
    it = _stream(
        target,
        draft,
        tokenizer,
        prompt,
        k=k,
        max_new_tokens=max_new_tokens,
        sampling=resolve_sampling(target, temperature, top_k, top_p, repetition_penalty),
        stop=[stop] if isinstance(stop, str) else stop,
        stop_token_ids=stop_token_ids,
        seed=seed,
    )
    return TextStream(it)


def speculative_generate(
    target: Qwen,
    draft: Qwen,
    tokenizer,
    prompt: Prompt,
    *,
    k: int = 4,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> SpeculativeCompletion:
    """Continue one prompt (text or token ids) with `target`, `draft` proposing k tokens per target forward.

    Settings as in qwen15.generation.generate (None: the target's generation_config.json; temperature 0 greedy;
    stop_token_ids None: the target's eos ids); greedy tokens are those of `generate(target, ...)`, sampled ones
    follow its distribution. tokenizer may be None for token-id prompts; with a tokenizer, ids beyond it (the
    embedding's padding rows) are never produced, as in generate.
    """
    stream = speculative_stream(
        target,
        draft,
        tokenizer,
        prompt,
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=stop,
        stop_token_ids=stop_token_ids,
        seed=seed,
    )
    for _ in stream:
        pass
    return stream.completion
