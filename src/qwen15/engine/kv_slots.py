"""The engine's KV cache: a fixed number of slots, each a row of `max_len` positions holding one sequence.

Why slots rather than pages: our attention is SDPA (on CPU and GPU), which wants each row's keys contiguous. With
pages every decode step would first gather each running sequence's keys and values into a contiguous batch, at
every layer; on CPU at 32 streams that copy costs more than reading the weights. Slots let the decode step read
the cache in place ([slots, kv_heads, positions, head_dim] per layer, rows 0..B-1 are the batch) and keep its
shapes static for CUDA graphs. The price: a slot reserves max_len positions whatever its sequence uses, so the
memory budget / (max_len x bytes per token) decides how many sequences run at once (`--max-model-len` trades
context for concurrency).

Prefix reuse: a slot remembers the tokens whose keys and values it holds, also after its sequence retires. A new
sequence whose prompt starts with the same tokens (a multi-turn chat resending its earlier turns, n > 1 choices,
a shared system prompt) takes that slot, or gets the prefix copied from a busy one, and prefills only the rest.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen15.model import KVCache


def bytes_per_token(config, dtype: torch.dtype, tensor_parallel: int = 1) -> int:
    """Keys and values of one token over all layers (of one tensor-parallel rank)."""
    heads = max(1, config.num_key_value_heads // tensor_parallel)
    return (
        2 * config.num_hidden_layers * heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    )


def size_slots(
    per_token: int, context: int, *, memory: int | None, max_num_seqs: int, max_model_len: int | None
) -> tuple[int, int]:
    """(slots, positions per slot) for a KV budget of `memory` bytes (None: max_num_seqs slots of max_model_len).

    With max_model_len given, the budget decides the number of slots (at most max_num_seqs); without it, every one
    of max_num_seqs slots gets an equal share of the budget, up to the model's context."""
    max_num_seqs = max(1, max_num_seqs)
    if max_model_len is None:
        share = context if memory is None else memory // (per_token * max_num_seqs)
        max_model_len = min(context, share)
    if max_model_len < 2:
        raise ValueError(f"a KV budget of {memory} bytes gives each of {max_num_seqs} sequences no room")
    slots = max_num_seqs if memory is None else min(max_num_seqs, memory // (per_token * (max_model_len + 1)))
    if slots < 1:
        raise ValueError(
            f"a KV budget of {memory} bytes does not hold one sequence of {max_model_len} tokens "
            f"({per_token * (max_model_len + 1)} bytes)"
        )
    return slots, max_model_len


def common_prefix(held: list[int], prompt: list[int], limit: int) -> int:
    n = min(len(held), len(prompt), limit)
    if n == 0 or held[0] != prompt[0]:
        return 0
    differ = np.flatnonzero(np.asarray(held[:n]) != np.asarray(prompt[:n]))
    return int(differ[0]) if len(differ) else n


class SlotCache:
    """Keys and values [slots, kv_heads, max_len + 1, head_dim] per layer, made on first write (a tensor-parallel
    rank gets its own heads). Column max_len takes the writes of idle batch rows and is never read."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.max_len = max_len
        self.trash = max_len
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.held: list[list[int]] = [[] for _ in range(num_slots)]  # tokens whose KV the slot holds
        self.owner: list[int | None] = [None] * num_slots  # id of the sequence using the slot
        self._released = [0] * num_slots  # when the slot was last released (for least-recently-used reuse)
        self._clock = 0

    # ------------------------------------------------------------------ memory

    def ensure(self, layer: int, like: torch.Tensor) -> None:
        if self.k[layer] is None:
            shape = (self.num_slots, like.shape[1], self.max_len + 1, like.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def allocate(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> SlotCache:
        like = torch.empty(1, kv_heads, 1, head_dim, dtype=dtype, device=device)
        for layer in range(self.num_layers):
            self.ensure(layer, like)
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    # ------------------------------------------------------------------ slots

    def used(self) -> int:
        return sum(o is not None for o in self.owner)

    def assign(self, seq_id: int, prompt: list[int], *, reuse: bool = True) -> tuple[int, int]:
        """A free slot for a new sequence, and how many leading prompt tokens already have their KV there (the
        last prompt token is always recomputed: its logits give the first new token).

        The slot is one of the lowest (index <= the number of busy slots): a decode step computes every row up
        to the highest busy slot, so busy slots kept low mean no idle rows (one sequence in slot 20 would decode
        21 rows). Among those: one holding the prompt's prefix, else an empty one, else the least recently
        released; a prefix held by a higher slot is copied down."""
        free = [s for s in range(self.num_slots) if self.owner[s] is None]
        if not free:
            raise RuntimeError("no free slot")
        low = [s for s in free if s <= self.num_slots - len(free)]
        best, found = None, 0
        if reuse:
            for s in range(self.num_slots):
                n = common_prefix(self.held[s], prompt, len(prompt) - 1)
                if n > found:
                    best, found = s, n
        empty = [s for s in low if not self.held[s]]
        if found and best in low and (found == len(self.held[best]) or not empty):
            slot = best  # the prefix is there already
        else:
            slot = empty[0] if empty else min(low, key=lambda s: self._released[s])
            if found:
                self.copy_prefix(best, slot, found)
        self.held[slot] = list(prompt[:found])
        self.owner[slot] = seq_id
        return slot, found

    def release(self, slot: int) -> None:
        """The slot is free again; its held tokens stay for reuse until another sequence takes it."""
        self.owner[slot] = None
        self._clock += 1
        self._released[slot] = self._clock

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        for t in self.k + self.v:
            if t is not None:
                t[dst, :, :n] = t[src, :, :n]

    @torch.inference_mode()
    def adopt(self, old: SlotCache) -> None:
        """Take over the cached prefixes of a smaller cache that this one replaces (its slots must be free)."""
        if old.k[0] is None:
            return
        for layer in range(self.num_layers):
            self.ensure(layer, old.k[layer])
        for s in range(min(self.num_slots, old.num_slots)):
            n = min(len(old.held[s]), self.max_len)
            for new, src in zip(self.k + self.v, old.k + old.v):
                new[s, :, :n] = src[s, :, :n]
            self.held[s] = old.held[s][:n]

    # ------------------------------------------------------------------ views for the model's forward

    def rows(self, batch: int) -> KVCache:
        """Slots 0..batch-1 as the cache of a decode forward (a view: writes land in the slots)."""
        view = KVCache(self.num_layers, batch, self.max_len + 1)
        view.k = [None if t is None else t[:batch] for t in self.k]
        view.v = [None if t is None else t[:batch] for t in self.v]
        return view

    def prefill_view(
        self, slots: list[int], starts: list[int], lengths: list[int], width: int
    ) -> PrefillView:
        return PrefillView(self, slots, starts, lengths, width)


class PrefillView:
    """Some slots as one left-padded batch of `width` positions for a prefill forward: row i holds its slot's
    first starts[i] tokens, then lengths[i] new ones, right-aligned (so the batch shares query positions, as a
    plain left-padded prompt batch does). The new keys and values are also written to the slots."""

    def __init__(self, cache: SlotCache, slots: list[int], starts: list[int], lengths: list[int], width: int):
        self.cache, self.slots, self.starts, self.lengths = cache, slots, starts, lengths
        self.max_len = width

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cache, width = self.cache, self.max_len
        cache.ensure(layer, k)
        out = []
        for pool, new in ((cache.k[layer], k), (cache.v[layer], v)):
            s = new.shape[2]
            view = new.new_zeros(new.shape[0], new.shape[1], width, new.shape[3])
            view[:, :, width - s :] = new  # padded queries land left of a row's tokens, overwritten next
            for i, (slot, start, n) in enumerate(zip(self.slots, self.starts, self.lengths)):
                if start:
                    view[i, :, width - n - start : width - n] = pool[slot, :, :start]
                pool[slot, :, start : start + n] = new[i, :, s - n :]
            out.append(view)
        return out[0], out[1]
