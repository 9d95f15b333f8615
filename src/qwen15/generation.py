"""Generation: prefill, then one-token decode steps over a preallocated KV cache, for a batch of prompts.

    from qwen15 import Qwen, Tokenizer, generate
    out = generate(model, tokenizer, ["Hello", "The capital of France is"], max_new_tokens=32, temperature=0)
    out[1].text, out[1].token_ids, out[1].finish_reason          # "stop" or "length"

Prompts of different lengths are left-padded into one batch: padded cache slots are masked out of attention and
each row's positions start at 0 at its first real token, as transformers does, so greedy tokens match
transformers' `generate` exactly in fp32. Rows stop on their own (a stop id, a stop string, or max_new_tokens);
the batch runs until every row has stopped.

Speed. On CPU the decode step is the model's eager forward over the cache filled so far (attention reads only the
slots written). On GPU (`compile=True`, the default there) the step sees static shapes — the whole cache, a fixed
padding mask, tensors for the position and slot — and runs under `torch.compile(mode="reduce-overhead")`, i.e.
CUDA graphs; the cache buffers are marked static so a replay never copies them. The host reads each step's tokens
through a pinned buffer while the next step is already queued, so the GPU never waits on Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen15.errors import UserError
from qwen15.model import KVCache, Qwen
from qwen15.sampling import SamplingParams, pick

Prompt = str | Sequence[int]

# Used for keys that a checkpoint's generation_config.json lacks while it asks to sample (Qwen1.5-Chat's files
# carry top_p and repetition_penalty only; transformers would then silently use top_k 50 and temperature 1.0).
SAMPLING_FALLBACK = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1}
CACHE_BUCKET = 256  # compiled steps see cache lengths rounded up to this, so new lengths rarely recompile


class GenerationError(UserError):
    """A request that cannot be generated (empty prompt, prompt longer than the context window, bad stop list)."""


@dataclass
class Completion:
    """One prompt's result. token_ids are the new tokens (a stop id that ended the row is not included; the tokens
    that completed a stop string are); text is their decoding, cut before the stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    stop: int | str | None = None  # the stop id or stop string that ended the row


def sampling_defaults(generation_config: dict[str, Any] | None) -> SamplingParams:
    """Sampling settings from a checkpoint's generation_config.json: greedy unless it says do_sample; keys it lacks
    come from SAMPLING_FALLBACK. No file: greedy."""
    if not generation_config:
        return SamplingParams()
    gc = generation_config
    penalty = float(gc.get("repetition_penalty") or 1.0)
    if not gc.get("do_sample", False):
        return SamplingParams(repetition_penalty=penalty)
    return SamplingParams(
        temperature=float(gc.get("temperature", SAMPLING_FALLBACK["temperature"])),
        top_k=int(gc.get("top_k", SAMPLING_FALLBACK["top_k"]) or 0),
        top_p=float(gc.get("top_p", SAMPLING_FALLBACK["top_p"])),
        repetition_penalty=float(gc.get("repetition_penalty", SAMPLING_FALLBACK["repetition_penalty"])),
    )


def default_stop_ids(model: Qwen, tokenizer=None) -> list[int]:
    """The checkpoint's generation_config.json eos ids, else config.json's, else the tokenizer's eos."""
    gc = getattr(model, "generation_config", None) or {}
    ids = gc.get("eos_token_id")
    if ids is None:
        ids = model.config.eos_token_ids
    if isinstance(ids, int):
        ids = [ids]
    if not ids and tokenizer is not None:
        ids = [tokenizer.eos_id]
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------- text per row


class _Row:
    """Tokens, text and stop state of one prompt while it generates; also what is safe to stream yet."""

    def __init__(self, prompt_len: int, tokenizer, stop_ids: frozenset[int], stops: tuple[str, ...]):
        self.prompt_len = prompt_len
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        self.stop: int | str | None = None
        self._stop_ids = stop_ids
        self._stops = stops
        self._decoder = tokenizer.stream_decoder() if tokenizer is not None else None

    def add(self, token: int, max_new_tokens: int) -> None:
        if token in self._stop_ids:
            self._finish("stop", token)
            return
        self.ids.append(token)
        if self._decoder is not None:
            before = len(self.text)
            self.text += self._decoder.add(token)
            if self._stops and self._cut_at_stop(max(0, before - max(map(len, self._stops)) + 1)):
                return
        if len(self.ids) >= max_new_tokens:
            self._finish("length", None)

    def _cut_at_stop(self, search_from: int) -> bool:
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        idx, s = min(hits)
        self.text = self.text[:idx]
        self.finish, self.stop = "stop", s
        return True

    def _finish(self, reason: str, stop: int | None) -> None:
        if self._decoder is not None:
            before = len(self.text)
            self.text += self._decoder.flush()  # an incomplete UTF-8 tail becomes U+FFFD, as decode() gives
            if self._stops and len(self.text) > before and self._cut_at_stop(0):
                return
        self.finish, self.stop = reason, stop

    def delta(self) -> str:
        """Text not streamed yet, minus a tail that could still turn out to be the start of a stop string."""
        end = len(self.text)
        if self.finish is None and self._stops:
            end -= _held_back(self.text, self._stops)
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def completion(self) -> Completion:
        return Completion(self.ids, self.text, self.finish or "length", self.prompt_len, self.stop)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------------------------- the steps


def prefill(
    model: Qwen, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """Run the left-padded prompts [B, P] through the model, filling cache slots 0..P-1; next-token logits
    [B, vocab] in fp32."""
    width = ids.shape[1]
    logits = model(
        ids,
        position_ids=positions,
        kv_cache=cache,
        cache_positions=torch.arange(width, device=ids.device),
        key_padding_mask=key_mask[:, :width],
        last_only=True,
    )
    return logits[:, -1].float()


def decode_one_token(
    model: Qwen,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """One new token per row: tokens [B] at positions [B] go to cache slot `slot` [1]; attention reads the
    first key_mask.shape[1] slots (False = a row's padding). Next-token logits [B, vocab] in fp32."""
    logits = model(
        tokens[:, None],
        position_ids=positions[:, None],
        kv_cache=cache,
        cache_positions=slot,
        key_padding_mask=key_mask,
        last_only=True,
    )
    return logits[:, -1].float()


# ---------------------------------------------------------------------------------------------- the engine


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, P] left-padded prompt ids
    pads: torch.Tensor  # [B] number of padding slots on the left
    lengths: list[int]


def _to_ids(prompt: Prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
        return tokenizer.encode(prompt)
    ids = [int(i) for i in prompt]
    return ids


def _is_single(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, torch.Tensor):
        return prompts.dim() == 1
    return len(prompts) > 0 and all(isinstance(p, int) for p in prompts)


class Generator:
    """A reusable generation engine for one model: keeps the compiled decode step (GPU) between calls.

    `generate(...)` below builds one per call on CPU (nothing worth keeping) and keeps one per model on GPU.
    """

    def __init__(self, model: Qwen, tokenizer=None, *, compile: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.dtype = _compute_dtype(model)
        self.compile = self.device.type == "cuda" if compile is None else compile
        self._step = None
        self._buffers: tuple[KVCache, torch.Tensor] | None = None
        cfg = model.config
        self.vocab = cfg.vocab_size
        self.valid_vocab = min(self.vocab, len(tokenizer)) if tokenizer is not None else self.vocab
        self.max_context = cfg.max_position_embeddings

    # ------------------------------------------------------------------ inputs

    def _batch(self, prompts: list[list[int]]) -> _Batch:
        lengths = [len(p) for p in prompts]
        for i, n in enumerate(lengths):
            if n == 0:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            if n >= self.max_context:
                raise GenerationError(
                    f"prompt {i} has {n} tokens but the context window is {self.max_context}; shorten it"
                )
            if max(prompts[i]) >= self.vocab or min(prompts[i]) < 0:
                raise GenerationError(f"prompt {i} has a token id outside the vocabulary [0, {self.vocab})")
        width = max(lengths)
        pad_id = self.tokenizer.pad_id if self.tokenizer is not None else 0
        pad_id = pad_id if pad_id < self.vocab else 0
        rows = [[pad_id] * (width - n) + p for p, n in zip(prompts, lengths)]
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        pads = torch.tensor([width - n for n in lengths], dtype=torch.long, device=self.device)
        return _Batch(ids, pads, lengths)

    # ------------------------------------------------------------------ steps

    def _new_cache(self, batch: int, length: int) -> KVCache:
        cfg = self.model.config
        return KVCache(cfg.num_hidden_layers, batch, length).allocate(
            _local_kv_heads(self.model), cfg.head_dim, self.dtype, self.device
        )

    def _static_buffers(self, batch: int, length: int) -> tuple[KVCache, torch.Tensor]:
        """The cache and padding mask of the compiled step, kept between calls of the same shape: CUDA graphs
        then use them in place (marked static), never copying them and never re-recording for new addresses.
        Stale slots from an earlier call are harmless: each is rewritten before a query can reach it, and
        padding slots are masked."""
        if (
            self._buffers is None
            or self._buffers[0].max_len != length
            or self._buffers[0].batch_size != batch
        ):
            self._buffers = None  # free the old cache first
            cache = self._new_cache(batch, length)
            key_mask = torch.ones(batch, length, dtype=torch.bool, device=self.device)
            for t in [*cache.k, *cache.v, key_mask]:
                torch._dynamo.mark_static_address(t)
            self._buffers = (cache, key_mask)
        return self._buffers

    def _compiled_step(self):
        if self._step is None:
            self._step = torch.compile(
                decode_one_token,
                mode="reduce-overhead" if self.device.type == "cuda" else None,
                fullgraph=True,
                dynamic=False,
            )
        return self._step

    # ------------------------------------------------------------------ the loop

    def stream(
        self,
        prompts: list[Prompt],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yields (prompt index, text delta) as text is decoded; returns the completions (StopIteration.value)."""
        sampling = sampling or SamplingParams()
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        stops = tuple(s for s in (stop or ()) if s)
        if stops and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer")
        stop_ids = frozenset(
            int(i)
            for i in (
                default_stop_ids(self.model, self.tokenizer) if stop_token_ids is None else stop_token_ids
            )
        )
        id_prompts = [_to_ids(p, self.tokenizer) for p in prompts]
        batch = self._batch(id_prompts)
        rows = [_Row(n, self.tokenizer, stop_ids, stops) for n in batch.lengths]
        b, width = batch.ids.shape
        budget = min(max_new_tokens, self.max_context - width)
        model, dev = self.model, self.device

        cache_len = width + budget
        if self.compile:
            cache_len = min(math.ceil(cache_len / CACHE_BUCKET) * CACHE_BUCKET, self.max_context)
        slots = torch.arange(cache_len, device=dev)
        if self.compile:
            cache, key_mask = self._static_buffers(b, cache_len)
            key_mask.copy_(slots[None, :] >= batch.pads[:, None])
        else:
            cache = self._new_cache(b, cache_len)
            key_mask = slots[None, :] >= batch.pads[:, None]  # False on each row's left padding
        generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        seen = None
        if sampling.repetition_penalty != 1.0:  # ids seen in each row (its padding is no token of the row)
            seen = torch.zeros(b, self.vocab, dtype=torch.bool, device=dev)
            for i, p in enumerate(id_prompts):
                seen[i, torch.tensor(p, device=dev)] = True

        with torch.inference_mode():
            positions = (slots[:width][None, :] - batch.pads[:, None]).clamp(min=0)
            logits = prefill(model, cache, batch.ids, positions, key_mask)
            step = self._compiled_step() if self.compile else None
            slot = torch.tensor([width], device=dev)
            next_pos = positions[:, -1] + 1
            host = torch.empty(b, dtype=torch.long, pin_memory=dev.type == "cuda")
            ready = torch.cuda.Event() if dev.type == "cuda" else None
            for t in range(budget):
                tokens = pick(self._mask_padding_vocab(logits), sampling, seen, generator)
                host.copy_(tokens, non_blocking=True)
                if ready is not None:
                    ready.record()
                last = t + 1 >= budget
                if not last:  # queue the next step before reading this one's tokens
                    if seen is not None:
                        seen.scatter_(1, tokens[:, None], True)
                    if self.compile:  # static shapes: the whole cache, every step
                        if dev.type == "cuda":
                            torch.compiler.cudagraph_mark_step_begin()
                        logits = step(model, cache, tokens, next_pos, slot, key_mask).clone()
                    else:  # attention reads only the slots written so far
                        logits = decode_one_token(
                            model, cache, tokens, next_pos, slot, key_mask[:, : width + t + 1]
                        )
                    next_pos = next_pos + 1
                    slot = slot + 1
                if ready is not None:
                    ready.synchronize()
                for i, tok in enumerate(host.tolist()):
                    row = rows[i]
                    if row.finish is not None:
                        continue
                    row.add(tok, budget)
                    if last and row.finish is None:
                        row._finish("length", None)
                    delta = row.delta()
                    if delta:
                        yield i, delta
                if all(r.finish is not None for r in rows):
                    break
        return [r.completion() for r in rows]

    def _mask_padding_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.valid_vocab < logits.shape[-1]:
            logits[:, self.valid_vocab :] = -float("inf")
        return logits

    def generate(self, prompts: list[Prompt], **kwargs) -> list[Completion]:
        it = self.stream(prompts, **kwargs)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value


def _local_kv_heads(model: Qwen) -> int:
    """Key/value heads this process computes, read from the k projection's (local) weight: all of them, or
    num_key_value_heads / tp on a tensor-parallel rank."""
    layers = getattr(model, "layers", None)
    if not layers:  # no blocks to read (a pipeline stage without layers, a stand-in model)
        return model.config.num_key_value_heads
    attn = next(iter(layers.values())).self_attn
    if attn.qkv_sizes is not None:  # fused projections (never tensor-parallel)
        return attn.qkv_sizes[1] // model.config.head_dim
    if not isinstance(attn.k_proj, torch.nn.Linear):  # a quantized or packed module: never tensor-parallel
        return attn.k_proj.out_features // model.config.head_dim
    weight = attn.k_proj.weight
    if hasattr(weight, "to_local"):  # a DTensor shard
        weight = weight.to_local()
    return weight.shape[0] // model.config.head_dim


def _compute_dtype(model: Qwen) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float32


# ---------------------------------------------------------------------------------------------- public functions

_GENERATORS: dict[int, Generator] = {}


def _engine(model: Qwen, tokenizer, compile: bool | None) -> Generator:
    """One Generator per model on GPU (its compiled step is worth keeping); a fresh one on CPU."""
    engine = _GENERATORS.get(id(model))
    if engine is None or engine.model is not model or engine.tokenizer is not tokenizer:
        engine = Generator(model, tokenizer, compile=compile)
        if engine.compile:
            _GENERATORS.clear()
            _GENERATORS[id(model)] = engine
    elif compile is not None and engine.compile != compile:
        engine = Generator(model, tokenizer, compile=compile)
    return engine


def _sampling(model, temperature, top_k, top_p, repetition_penalty) -> SamplingParams:
    base = sampling_defaults(getattr(model, "generation_config", None))
    return SamplingParams(
        temperature=base.temperature if temperature is None else float(temperature),
        top_k=base.top_k if top_k is None else int(top_k),
        top_p=base.top_p if top_p is None else float(top_p),
        repetition_penalty=base.repetition_penalty
        if repetition_penalty is None
        else float(repetition_penalty),
    )


def generate(
    model: Qwen,
    tokenizer,
    prompts: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    compile: bool | None = None,
) -> Completion | list[Completion]:
    """Continue each prompt (text, or a list of token ids); one Completion per prompt (a single one for a single
    prompt).

    Sampling settings left None come from the model's generation_config.json (see `sampling_defaults`); without
    that file, decoding is greedy. temperature 0 is greedy. stop_token_ids None: the checkpoint's eos ids (151645
    and 151643 for Qwen1.5-Chat); [] disables. stop: strings that end a row, left out of its text. seed: a private
    generator for sampling (same seed, same inputs: same tokens); None uses torch's global generator.
    compile: the compiled static-shape decode step (default: on for CUDA, off on CPU).
    """
    single = _is_single(prompts)
    batch = [prompts] if single else list(prompts)
    if not batch:
        return []
    if isinstance(stop, str):
        stop = [stop]
    engine = _engine(model, tokenizer, compile)
    out = engine.generate(
        batch,
        max_new_tokens=max_new_tokens,
        sampling=_sampling(model, temperature, top_k, top_p, repetition_penalty),
        stop=stop,
        stop_token_ids=stop_token_ids,
        seed=seed,
    )
    return out[0] if single else out


@dataclass
class TextStream:
    """Iterate for text deltas of one prompt as they are decoded; `completion` is set once the iteration ends."""

    _it: Iterator[tuple[int, str]]
    completion: Completion | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                _, delta = next(self._it)
            except StopIteration as done:
                self.completion = done.value[0]
                return
            yield delta


def stream_generate(
    model: Qwen,
    tokenizer,
    prompt: Prompt,
    *,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    compile: bool | None = None,
) -> TextStream:
    """Like `generate` for one prompt, streaming: `for delta in stream: print(delta, end="")`; the deltas joined
    equal `stream.completion.text` (never half a UTF-8 character, never part of a stop string)."""
    if isinstance(stop, str):
        stop = [stop]
    engine = _engine(model, tokenizer, compile)
    it = engine.stream(
        [prompt],
        max_new_tokens=max_new_tokens,
        sampling=_sampling(model, temperature, top_k, top_p, repetition_penalty),
        stop=stop,
        stop_token_ids=stop_token_ids,
        seed=seed,
    )
    return TextStream(it)
