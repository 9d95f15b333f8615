"""Generation: continue a batch of prompts (greedy or sampled), with stop ids, stop strings and streaming.

    from qwen15 import Qwen, Tokenizer, generate
    out = generate(model, tokenizer, ["Hello", "The capital of France is"], max_new_tokens=32, temperature=0)
    out[1].text, out[1].token_ids, out[1].finish_reason          # "stop" or "length"

The prompts run through the continuous-batching engine (qwen15.engine), the package's one decode loop: each
prompt is a sequence in its own KV slot, prefilled in one left-padded batch (padded positions masked, each row's
positions starting at 0 at its first real token, as transformers does) and decoded in one batched step per token,
so greedy tokens match transformers' `generate` in fp32. A row stops on its own (a stop id, a stop string, or
max_new_tokens) and leaves the batch. The text — detokenization, stop strings, streaming deltas — is
qwen15.output_text, above the engine.

Speed. On CPU the decode step is the model's eager forward over the slots in use. On GPU (`compile=True`, the
default there) the step has static shapes per batch bucket and runs as captured CUDA graphs (qwen15.engine.
decode_step); the engine is kept per model between calls so that its graphs are captured once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen15.engine.engine import Engine, SequenceParams
from qwen15.errors import UserError
from qwen15.model import Qwen
from qwen15.model_config import CHAT_SAMPLING
from qwen15.output_text import OutputText
from qwen15.sampling import SamplingParams

Prompt = str | Sequence[int]

CACHE_BUCKET = 256  # static (CUDA-graph) engines round slot lengths up to this: rarely rebuilt


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
    come from CHAT_SAMPLING (Qwen1.5-Chat's files carry top_p and repetition_penalty only; transformers would then
    silently use top_k 50 and temperature 1.0). No file: greedy."""
    if not generation_config:
        return SamplingParams()
    gc = generation_config
    penalty = float(gc.get("repetition_penalty") or 1.0)
    if not gc.get("do_sample", False):
        return SamplingParams(repetition_penalty=penalty)
    return SamplingParams(
        temperature=float(gc.get("temperature", CHAT_SAMPLING["temperature"])),
        top_k=int(gc.get("top_k", CHAT_SAMPLING["top_k"]) or 0),
        top_p=float(gc.get("top_p", CHAT_SAMPLING["top_p"])),
        repetition_penalty=float(gc.get("repetition_penalty", CHAT_SAMPLING["repetition_penalty"])),
    )


def chat_sampling_defaults(generation_config: dict[str, Any] | None) -> SamplingParams:
    """What a chat samples with when the request does not say: the checkpoint's settings (sampling_defaults),
    or Qwen1.5-Chat's recommended values (CHAT_SAMPLING) when the checkpoint has no generation_config.json."""
    if generation_config is None:
        return SamplingParams(**CHAT_SAMPLING)
    return sampling_defaults(generation_config)


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


# ---------------------------------------------------------------------------------------------- the engine's user


def _to_ids(prompt: Prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
        return tokenizer.encode(prompt)
    return [int(i) for i in prompt]


def _is_single(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, torch.Tensor):
        return prompts.dim() == 1
    return len(prompts) > 0 and all(isinstance(p, int) for p in prompts)


class Generator:
    """Generation for one model over an engine it keeps between calls (its slots, and on GPU its CUDA graphs).

    `generate(...)` below builds one per call on CPU and keeps one per model on GPU. prefix_reuse: a later call
    whose prompt starts like an earlier one's prompt and output reuses their KV (chat turns); off by default so
    that a call's result never depends on the calls before it.
    """

    def __init__(
        self, model: Qwen, tokenizer=None, *, compile: bool | None = None, prefix_reuse: bool = False
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.prefix_reuse = prefix_reuse
        self.engine: Engine | None = None
        cfg = model.config
        self.vocab = cfg.vocab_size
        self.valid_vocab = min(self.vocab, len(tokenizer)) if tokenizer is not None else self.vocab
        self.max_context = cfg.max_position_embeddings

    def _check(self, prompts: list[list[int]]) -> None:
        for i, p in enumerate(prompts):
            if not p:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            if len(p) >= self.max_context:
                raise GenerationError(
                    f"prompt {i} has {len(p)} tokens but the context window is {self.max_context}; shorten it"
                )
            if max(p) >= self.vocab or min(p) < 0:
                raise GenerationError(f"prompt {i} has a token id outside the vocabulary [0, {self.vocab})")

    def _engine_for(self, rows: int, length: int) -> Engine:
        """An engine with at least `rows` slots of `length` positions: the kept one, or a bigger one that takes
        over the kept one's cached prefixes."""
        old = self.engine
        if old is not None and old.num_slots >= rows and old.max_len >= length:
            return old
        if self.compile:
            length = math.ceil(length / CACHE_BUCKET) * CACHE_BUCKET
        if old is not None:
            rows, length = max(rows, old.num_slots), max(length, old.max_len)
        length = min(length, self.max_context)
        new = Engine(
            self.model,
            num_slots=rows,
            max_len=length,
            prefix_reuse=self.prefix_reuse,
            static=self.compile,
            valid_vocab=self.valid_vocab,
        )
        if old is not None and self.prefix_reuse:
            new.cache.adopt(old.cache)
        self.engine = None  # the old cache goes before the new one is filled
        self.engine = new
        return new

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
        """Yields (prompt index, text delta) as text is decoded; returns the completions (StopIteration.value).
        Each prompt samples with its own generator seeded `seed`, so its tokens are those it gets alone."""
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
        self._check(id_prompts)
        engine = self._engine_for(len(id_prompts), max(map(len, id_prompts)) + max_new_tokens)
        params = SequenceParams(max_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids, seed=seed)
        row = {engine.add(p, params)[0]: i for i, p in enumerate(id_prompts)}
        texts = [OutputText(self.tokenizer, stops) for _ in id_prompts]
        pending = set(row)
        try:
            while pending:
                for event in engine.step():
                    i = row.get(event.seq_id)
                    if i is None or event.seq_id not in pending:
                        continue
                    out = texts[i]
                    if event.token is not None:
                        out.add(event.token)
                    if out.finish is not None:  # a stop string: the engine learns at its next step
                        engine.cancel([event.seq_id])
                        pending.discard(event.seq_id)
                    elif event.finish is not None:
                        out.end(event.finish, event.stop_id)
                        pending.discard(event.seq_id)
                    delta = out.delta()
                    if delta:
                        yield i, delta
        finally:
            if pending:  # the caller stopped early (or an error): free the slots
                engine.cancel(list(pending))
                engine.step()
        return [
            Completion(t.ids, t.text, t.finish or "length", len(p), t.stop) for t, p in zip(texts, id_prompts)
        ]

    def generate(self, prompts: list[Prompt], **kwargs) -> list[Completion]:
        it = self.stream(prompts, **kwargs)
        while True:
            try:
                next(it)
            except StopIteration as done:
                return done.value


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


def resolve_sampling(model, temperature, top_k, top_p, repetition_penalty) -> SamplingParams:
    """The sampling settings of a call: those given, the rest from the model's generation_config.json."""
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
        sampling=resolve_sampling(model, temperature, top_k, top_p, repetition_penalty),
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
        sampling=resolve_sampling(model, temperature, top_k, top_p, repetition_penalty),
        stop=stop,
        stop_token_ids=stop_token_ids,
        seed=seed,
    )
    return TextStream(it)
