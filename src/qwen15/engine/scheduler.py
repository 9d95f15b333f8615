"""Sequences, the bounded waiting queue, admission into free KV slots, and the plan of each step's prefill.

Admission is first come, first served, into any free slot (a waiting sequence needs one slot: a slot always holds
a whole sequence up to the context limit, so an admitted sequence never runs out of memory and nothing is ever
preempted). Prefill is chunked: a step prefills at most `prefill_chunk` token positions (padding counted), a
prompt that fits in one chunk is prefilled whole, a longer one in pieces of exactly `prefill_chunk` tokens, so
that a long prompt delays everyone else's next token by one chunk's compute at most, and a prompt's chunks are
the same whatever else is running.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from qwen15.errors import UserError
from qwen15.sampling import SamplingParams


class QueueFull(UserError):
    """The waiting queue is at its bound: try again later (HTTP 503)."""


class RequestTooLong(UserError):
    """A prompt (plus the tokens asked for) that cannot fit one sequence's context."""


@dataclass(frozen=True)
class SequenceParams:
    """How one sequence is generated. max_tokens: new tokens at most; stop_ids end it (they are not output);
    seed: its own generator (None: torch's global one); logprobs: None, or how many alternatives to report with
    each token's log-probability (0: only the token's own)."""

    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None
    logprobs: int | None = None


@dataclass
class Sequence:
    id: int
    tokens: list[int]  # the prompt, then the generated tokens
    prompt_len: int
    params: SequenceParams
    arrival: float = field(default_factory=time.monotonic)
    after: Sequence | None = None  # another choice of the same request, whose prompt KV this one copies
    slot: int | None = None
    computed: int = 0  # leading tokens whose KV is in the slot
    sampled: int = 0  # tokens picked, also those the engine has not read back yet
    reused: int = 0  # of those, how many came from prefix reuse
    sampler: object = None  # engine.sampler.RowState, made at admission
    finish: str | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        """Still has prompt tokens without KV (a decoding sequence has exactly one token to feed: its last pick)."""
        return self.sampled == 0


@dataclass
class PrefillRow:
    seq: Sequence
    start: int  # first position fed
    length: int  # tokens fed

    @property
    def last(self) -> bool:
        """The chunk ends the prompt: its last logits give the first new token."""
        return self.start + self.length == len(self.seq.tokens)


class Scheduler:
    def __init__(self, num_slots: int, max_len: int, *, prefill_chunk: int, max_queue: int | None):
        self.num_slots = num_slots
        self.max_len = max_len
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # by id, in admission order
        self._ids = itertools.count()

    def new_id(self) -> int:
        return next(self._ids)

    def check(self, prompt_len: int, params: SequenceParams) -> None:
        if prompt_len == 0:
            raise RequestTooLong("the prompt is empty; give at least one token")
        if prompt_len >= self.max_len:
            raise RequestTooLong(
                f"the prompt has {prompt_len} tokens but the context is {self.max_len} tokens; shorten it"
            )
        if params.max_tokens < 1:
            raise RequestTooLong(f"max_tokens must be at least 1, got {params.max_tokens}")

    def add(self, seqs: list[Sequence]) -> None:
        if self.max_queue is not None and len(self.waiting) + len(seqs) > self.max_queue:
            raise QueueFull(
                f"the server is at capacity ({len(self.running)} running, {len(self.waiting)} waiting); retry later"
            )
        self.waiting.extend(seqs)

    def admissible(self) -> list[Sequence]:
        """Waiting sequences that may take a slot now, first come first served (a choice that copies another's
        prompt waits until that prompt is in the cache)."""
        free = self.num_slots - len(self.running)
        out = []
        for seq in self.waiting:
            if len(out) >= free:
                break
            if seq.after is not None and seq.after.finish is None and seq.after.prefilling:
                continue
            out.append(seq)
        return out

    def start(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.running[seq.id] = seq

    def remove(self, seq: Sequence) -> None:
        if seq.id in self.running:
            del self.running[seq.id]
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def decoding(self) -> list[Sequence]:
        return [s for s in self.running.values() if not s.prefilling]

    def plan_prefill(self) -> list[PrefillRow]:
        """This step's prefill rows: whole prompts while they fit in the chunk budget (padding counted), or one
        chunk of a long prompt."""
        rows: list[PrefillRow] = []
        width = 0
        for seq in self.running.values():
            if not seq.prefilling:
                continue
            remaining = len(seq.tokens) - seq.computed
            n = remaining if remaining <= self.prefill_chunk else self.prefill_chunk
            if rows and (len(rows) + 1) * max(width, n) > self.prefill_chunk:
                continue  # next step; a shorter prompt behind it may still fit this one
            rows.append(PrefillRow(seq, seq.computed, n))
            width = max(width, n)
        return rows
