"""Engine: continuous batching of token sequences over one model.

    engine = Engine(model, num_slots=8, max_len=2048)
    [sid] = engine.add(prompt_ids, SequenceParams(max_tokens=64))
    while engine.busy:
        for event in engine.step():      # TokenEvent(seq_id, token, finish, ...)
            ...

Each `step()`: take the requests and cancellations that arrived since the last step (any thread may call add
and cancel), admit waiting sequences into free KV slots (reusing a cached prefix), decode one token for every
decoding sequence in one batched forward, prefill the next chunk of the admitted ones, and retire every sequence
that finished (its slot is free for the next step). Finishing is by stop id (the id is not output), max_tokens,
or the slot's context; stop strings are the text layer's, which cancels the sequence.

Sampling and stop detection run on the model's device: each step's picks, and a finish code per row (go on, stop
id, length), stay device tensors, and the next decode step feeds each slot's last
pick from a device tensor. The host reads them back every `read_back_every` steps (and at once when a sequence
reaches its max_tokens or its context, which the host knows without the tokens), so on a GPU the host queues
several steps without waiting for any; tokens a sequence picked after its stop within one period are discarded,
never emitted. On CPU there is nothing to overlap and the default is 1 (every step's tokens at once).

Under tensor parallel every rank runs its own engine on the same commands (`sync` broadcasts rank 0's), so
their steps, and the tokens they pick with the same seeds, are identical.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen15.engine.decode_step import DecodeStep
from qwen15.engine.kv_slots import SlotCache
from qwen15.engine.sampler import MAX_LOGPROBS, Picks, RowState, sample
from qwen15.engine.scheduler import PrefillRow, QueueFull, RequestTooLong, Scheduler, Sequence, SequenceParams
from qwen15.errors import UserError

__all__ = ["Engine", "EngineStats", "QueueFull", "RequestTooLong", "SequenceParams", "TokenEvent"]

# On CUDA, steps queued between read-backs: the host syncs once per 4 steps instead of every step, and a stream
# gets its tokens at most 3 steps (a few ms for a small model) later; a sequence that stopped runs at most 3
# discarded steps more.
READ_BACK_CUDA = 4
GO_ON, STOP, LENGTH = 0, 1, 2  # a row's finish code in one step


@dataclass
class TokenEvent:
    """A new token of a sequence, or its end. token is None when it ended at a stop id (stop_id; not output).
    finish ("stop" or "length") is set on the sequence's last event."""

    seq_id: int
    token: int | None
    finish: str | None = None
    stop_id: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # of admitted sequences
    reused_tokens: int = 0  # prompt tokens whose KV came from prefix reuse
    prefill_tokens: int = 0  # tokens run through prefill
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    busy_seconds: float = 0.0
    finish_reasons: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        model,
        *,
        num_slots: int,
        max_len: int,
        prefill_chunk: int = 256,
        max_queue: int | None = None,
        prefix_reuse: bool = True,
        static: bool | None = None,
        compile_static: bool = True,
        valid_vocab: int | None = None,
        step_log: int = 10_000,
        step_log_path: str | None = None,
        read_back_every: int | None = None,
    ):
        """num_slots sequences run at once, each up to max_len tokens (prompt and output); static: the decode
        step in fixed shapes (default on CUDA: CUDA graphs; on CPU under torch.compile, or eagerly with
        compile_static False); valid_vocab: ids from here on (embedding padding rows) are never sampled;
        read_back_every: steps between reading the picks back to the host (default READ_BACK_CUDA on CUDA, 1
        elsewhere)."""
        self.model = model.eval()
        self.device = next(model.parameters()).device
        cfg = model.config
        self.vocab = cfg.vocab_size
        self.valid_vocab = min(valid_vocab or self.vocab, self.vocab)
        self.max_len = max_len
        self.prefix_reuse = prefix_reuse
        self.cache = SlotCache(cfg.num_hidden_layers, num_slots, max_len)
        self.scheduler = Scheduler(num_slots, max_len, prefill_chunk=prefill_chunk, max_queue=max_queue)
        static = self.device.type == "cuda" if static is None else static
        cuda = self.device.type == "cuda"
        self.decode = DecodeStep(
            model, self.cache, static=static, graphs=static and cuda, compile=compile_static
        )
        if read_back_every is None:
            read_back_every = READ_BACK_CUDA if cuda else 1
        if read_back_every < 1:
            raise ValueError(f"read_back_every must be at least 1, got {read_back_every}")
        self.read_back_every = read_back_every
        self._pending: list[tuple[list[Sequence], Picks, torch.Tensor]] = []  # picks not read back yet
        self._since = 0  # steps since the last read-back
        # per slot, on the device: the last pick (the next decode input), the tokens its sequence has generated,
        # its max_tokens and its stop ids (-1 pads)
        dev = self.device
        self._last = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self._generated = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self._max_tokens = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self._stops = torch.full((num_slots, 1), -1, dtype=torch.long, device=dev)
        self.stats = EngineStats()
        self.step_log: deque[dict] = deque(maxlen=step_log)
        self._log_file = open(step_log_path, "a", encoding="utf-8") if step_log_path else None  # noqa: SIM115
        self.sync: Callable[[list], list] | None = None  # tensor parallel: rank 0's commands to every rank
        self._lock = threading.Lock()
        self._inbox: list[tuple] = []
        self._queued = 0  # waiting, counted when added (the HTTP threads read it to refuse work)
        self._seqs: dict[int, Sequence] = {}
        self._next_id = 0
        self.closed = False  # set by a ("shutdown",) command (tensor parallel: rank 0 has stopped)

    # ------------------------------------------------------------------ any thread

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    def check(self, prompt: list[int], params: SequenceParams) -> None:
        """Raise RequestTooLong (a UserError) for a sequence this engine can never run."""
        self.scheduler.check(len(prompt), params)
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise RequestTooLong(f"the prompt has a token id outside the vocabulary [0, {self.vocab})")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise UserError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {params.logprobs}")

    def add(self, prompt: list[int], params: SequenceParams, n: int = 1) -> list[int]:
        """Queue n sequences of this prompt (choices of one request: choice i is seeded seed + i and copies the
        prompt's KV from choice 0); their ids. Raises QueueFull when the waiting queue is at its bound."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, params)
        with self._lock:
            limit = self.scheduler.max_queue
            if limit is not None and self._queued + n > limit:
                raise QueueFull(
                    f"the server is at capacity ({self._queued} requests waiting, {self.cache.num_slots} "
                    "running at most); retry later"
                )
            ids = list(range(self._next_id, self._next_id + n))
            self._next_id += n
            self._queued += n
            self._inbox.append(("add", ids, prompt, params))
        return ids

    def cancel(self, seq_ids: list[int]) -> None:
        """Stop these sequences; their slots are free at the next step (no further events for them)."""
        with self._lock:
            self._inbox.append(("cancel", list(seq_ids)))

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._inbox)

    def running(self) -> int:
        return len(self.scheduler.running)

    def waiting(self) -> int:
        return self._queued

    def tokens_held(self) -> int:
        """Positions in use by running sequences (KV in use)."""
        return sum(len(s.tokens) for s in list(self.scheduler.running.values()))

    # ------------------------------------------------------------------ the engine's thread

    def step(self) -> list[TokenEvent]:
        with self._lock:
            commands, self._inbox = self._inbox, []
        if self.sync is not None:
            commands = self.sync(commands)
        started = time.perf_counter()
        events: list[TokenEvent] = []
        entry: dict = {"step": self.stats.steps}
        cancelled = self._apply(commands)
        if cancelled:
            entry["cancelled"] = cancelled
        with torch.inference_mode():
            admitted = self._admit()
            decoding = self.scheduler.decoding()
            rows = self.scheduler.plan_prefill()
            self._forward(decoding, rows)
            if self._pending:
                self._since += 1
                if self._since >= self.read_back_every or self._must_read_back():
                    events += self._read_back()
        if admitted:
            entry["admitted"] = [[s.id, s.slot, s.reused] for s in admitted]
        if decoding:
            entry["decode"] = [s.id for s in decoding]
        if rows:
            entry["prefill"] = [[r.seq.id, r.start, r.length] for r in rows]
        finished = [[e.seq_id, e.finish] for e in events if e.finish]
        if finished:
            entry["finished"] = finished
        if len(entry) > 1:
            self.stats.steps += 1
            self.stats.busy_seconds += time.perf_counter() - started
            self.step_log.append(entry)
            if self._log_file is not None:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()
        return events

    def _apply(self, commands: list[tuple]) -> list[int]:
        """Add and cancel as commanded; the ids cancelled."""
        cancelled = []
        for command in commands:
            if command[0] == "add":
                _, ids, prompt, params = command
                first = None
                for i, sid in enumerate(ids):
                    seed = None if params.seed is None else params.seed + i
                    p = params if seed == params.seed else _with_seed(params, seed)
                    seq = Sequence(sid, list(prompt), len(prompt), p, after=first)
                    first = first or seq
                    self._seqs[sid] = seq
                    self.scheduler.waiting.append(seq)
            elif command[0] == "shutdown":
                self.closed = True
            else:
                for sid in command[1]:
                    seq = self._seqs.get(sid)
                    if seq is not None and seq.finish is None:
                        self.stats.cancelled += 1
                        self._retire(seq, "cancelled")
                        cancelled.append(sid)
        return cancelled

    def _admit(self) -> list[Sequence]:
        admitted = []
        for seq in self.scheduler.admissible():
            slot, reused = self.cache.assign(seq.id, seq.tokens, reuse=self.prefix_reuse)
            seq.slot, seq.computed, seq.reused = slot, reused, reused
            seq.sampler = RowState(
                seq.params.sampling, seq.params.seed, seq.params.logprobs, seq.tokens, self.vocab, self.device
            )
            self._start_slot(seq)
            self.scheduler.start(seq)
            seq.after = None
            with self._lock:
                self._queued -= 1
            self.stats.prompt_tokens += seq.prompt_len
            self.stats.reused_tokens += reused
            admitted.append(seq)
        return admitted

    def _start_slot(self, seq: Sequence) -> None:
        """The device-side finish state of a newly admitted sequence in its slot."""
        stops = sorted(seq.params.stop_ids)
        if len(stops) > self._stops.shape[1]:
            wider = torch.full((self.num_slots, len(stops)), -1, dtype=torch.long, device=self.device)
            wider[:, : self._stops.shape[1]] = self._stops
            self._stops = wider
        row = torch.full((self._stops.shape[1],), -1, dtype=torch.long)
        row[: len(stops)] = torch.tensor(stops, dtype=torch.long)
        self._stops[seq.slot] = row.to(self.device, non_blocking=True)
        self._generated[seq.slot] = 0
        self._max_tokens[seq.slot] = seq.params.max_tokens

    def _forward(self, decoding: list[Sequence], rows: list[PrefillRow]) -> None:
        """Decode one token of every decoding sequence, prefill this step's rows, and sample the decoded ones
        and the prompts that ended. With an eager decode step and a prompt ending here, both forwards stop at
        the final hidden states and share one pass of the output layer (the largest matrix of a small model:
        for 0.5B, 151936 x 1024 of its ~200M weights read per token)."""
        merge = bool(decoding) and any(r.last for r in rows) and not self.decode.static
        outs = []
        if decoding:
            out = self.decode([s.slot for s in decoding], self._last, [s.computed for s in decoding], merge)
            for s in decoding:
                s.computed += 1
            outs.append((decoding, out))
        if rows:
            done, out = self._prefill(rows, merge)
            if done:
                outs.append((done, out))
        if merge:
            logits = self.model.lm_head(torch.cat([out for _, out in outs]))
            sizes = [len(seqs) for seqs, _ in outs]
            outs = [(seqs, part) for (seqs, _), part in zip(outs, logits.split(sizes))]
        for seqs, logits in outs:
            self._sample(seqs, logits)

    def _prefill(self, rows: list[PrefillRow], hidden: bool) -> tuple[list[Sequence], torch.Tensor | None]:
        """Feed the rows' tokens; the sequences whose prompt ended, and their next-token logits (the model's
        dtype) or, with hidden, their final hidden states."""
        width = max(r.start + r.length for r in rows)
        seq_len = max(r.length for r in rows)
        ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
        positions = torch.zeros(len(rows), seq_len, dtype=torch.long)
        key_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, seq_len - r.length :] = torch.tensor(r.seq.tokens[r.start : r.start + r.length])
            positions[i, seq_len - r.length :] = torch.arange(r.start, r.start + r.length)
            key_mask[i, width - r.length - r.start :] = True
        dev = self.device
        view = self.cache.prefill_view(
            [r.seq.slot for r in rows], [r.start for r in rows], [r.length for r in rows], width
        )
        logits = self.model(
            ids.to(dev),
            position_ids=positions.to(dev),
            kv_cache=view,
            cache_positions=torch.arange(width - seq_len, width, device=dev),
            key_padding_mask=key_mask.to(dev),
            last_only=True,
            return_hidden=hidden,
        )[:, -1]
        done = []
        for i, r in enumerate(rows):
            self.cache.held[r.seq.slot].extend(r.seq.tokens[r.start : r.start + r.length])
            r.seq.computed += r.length
            self.stats.prefill_tokens += r.length
            if r.last:
                done.append(i)
        if not done:
            return [], None
        out = logits[torch.tensor(done, device=dev)]
        return [rows[i].seq for i in done], out

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick the next token of each sequence and decide on the device whether it ends there; both wait in
        _pending for the read-back. A sequence's new token has index s.computed (its length is then one more)."""
        picks = sample(logits, [s.sampler for s in seqs], self.valid_vocab)
        dev = self.device
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long).to(dev, non_blocking=True)
        length = torch.tensor([s.computed + 1 for s in seqs], dtype=torch.long).to(dev, non_blocking=True)
        tok = picks.tokens
        stop = (tok[:, None] == self._stops[slots]).any(dim=1)
        generated = self._generated[slots] + (~stop).long()
        full = (generated >= self._max_tokens[slots]) | (length >= self.max_len)
        code = torch.where(stop, STOP, torch.where(full, LENGTH, GO_ON))
        self._generated[slots] = generated
        self._last[slots] = tok
        for s in seqs:
            s.sampled += 1
        self._pending.append((seqs, picks, code))

    def _must_read_back(self) -> bool:
        """A pending sequence has reached its max_tokens or its context: it has finished, whatever its tokens."""
        return any(
            s.finish is None and (s.sampled >= s.params.max_tokens or s.computed + 1 >= self.max_len)
            for seqs, _, _ in self._pending
            for s in seqs
        )

    def _read_back(self) -> list[TokenEvent]:
        """The events of the pending steps, in order: one host transfer for all their picks and codes."""
        pending, self._pending, self._since = self._pending, [], 0
        flat = torch.cat([t for _, p, c in pending for t in (p.tokens, c)]).tolist()
        events = []
        at = 0
        for seqs, picks, _ in pending:
            n = len(seqs)
            tokens, codes = flat[at : at + n], flat[at + n : at + 2 * n]
            at += 2 * n
            info = {}
            if picks.want:
                chosen = picks.chosen.tolist()
                top_i = picks.top_ids.tolist() if picks.top_ids is not None else None
                top_v = picks.top_logprobs.tolist() if picks.top_logprobs is not None else None
                for j, i in enumerate(picks.want):
                    k = seqs[i].params.logprobs
                    top = list(zip(top_i[j][:k], top_v[j][:k])) if k else []
                    info[i] = (chosen[j], top)
            for i, (s, token, code) in enumerate(zip(seqs, tokens, codes)):
                if s.finish is not None:
                    continue  # picked after its sequence ended (earlier in this period), or cancelled since
                if code == STOP:
                    events.append(TokenEvent(s.id, None, "stop", stop_id=token))
                    self._retire(s, "stop")
                    continue
                s.tokens.append(token)
                self.stats.generated_tokens += 1
                logprob, top = info.get(i, (None, None))
                finish = "length" if code == LENGTH else None
                events.append(TokenEvent(s.id, token, finish, logprob=logprob, top=top))
                if finish:
                    self._retire(s, finish)
        for seqs, _, _ in pending:
            for s in seqs:
                if s.finish is None:
                    self._sync_held(s)
        return events

    def _sync_held(self, s: Sequence) -> None:
        """The slot's record of the tokens whose KV it holds: those fed so far (picks after a stop never count)."""
        held = self.cache.held[s.slot]
        held.extend(s.tokens[len(held) : min(s.computed, len(s.tokens))])

    def _retire(self, seq: Sequence, reason: str) -> None:
        if seq.slot is not None and self.cache.owner[seq.slot] == seq.id:
            self._sync_held(seq)
            self.cache.release(seq.slot)
        elif seq in self.scheduler.waiting:
            with self._lock:
                self._queued -= 1
        self.scheduler.remove(seq)
        seq.finish = reason
        seq.sampler = None
        self._seqs.pop(seq.id, None)
        self.stats.finished += 1
        self.stats.finish_reasons[reason] = self.stats.finish_reasons.get(reason, 0) + 1

    def run_until_idle(self) -> list[TokenEvent]:
        events = []
        while self.busy:
            events += self.step()
        return events


def _with_seed(params: SequenceParams, seed: int | None) -> SequenceParams:
    from dataclasses import replace

    return replace(params, seed=seed)
