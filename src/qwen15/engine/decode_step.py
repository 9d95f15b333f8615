"""The batched decode forward: every decoding sequence feeds its last token at its own position, in one call.

The batch rows are KV slots 0..B-1 (the cache is read in place); a slot without a decoding sequence in that range
(free, or still prefilling) is an idle row: it writes to the slot's spare column and attends to one stale key,
so it cannot disturb anything. Eager (the default on CPU): the exact shapes of each step. Static (`static=True`,
the default on GPU): the batch rounded up to a bucket (1, 2, 4, 8, 16, 32, ...) and the key length up to a
multiple of LENGTH_BUCKET, the inputs in fixed buffers; on GPU each (batch, length) shape is captured once as a
CUDA graph and replayed (no kernel launches from Python); on CPU the static step runs under torch.compile, which
is how its graph logic is tested without a GPU.
"""

from __future__ import annotations

import bisect

import torch

from qwen15.engine.kv_slots import SlotCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
LENGTH_BUCKET = 256


def decode_forward(model, cache, tokens, positions, cache_positions, key_mask, hidden=False) -> torch.Tensor:
    """Next-token logits [B, vocab] (the model's dtype) for tokens [B, 1] at positions [B, 1], written to
    cache_positions [B, 1] of the cache rows; attention reads the first key_mask.shape[1] positions (False:
    ignored). hidden: the final hidden states [B, hidden] instead (the caller applies the output layer)."""
    out = model(
        tokens,
        position_ids=positions,
        kv_cache=cache,
        cache_positions=cache_positions,
        key_padding_mask=key_mask,
        last_only=True,
        return_hidden=hidden,
    )
    return out[:, -1]


def bucket(n: int, buckets: tuple[int, ...], limit: int) -> int:
    i = bisect.bisect_left(buckets, n)
    return min(buckets[i] if i < len(buckets) else n, limit)


class DecodeStep:
    def __init__(self, model, cache: SlotCache, *, static: bool, graphs: bool, compile: bool = True):
        """static: fixed shapes per bucket; graphs: capture them (CUDA); compile: torch.compile the static step
        where it is not captured (off: the static step runs eagerly, to test its buckets quickly)."""
        self.model, self.cache = model, cache
        self.static, self.graphs, self.compile = static, graphs, compile
        self.device = next(model.parameters()).device
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._compiled = None
        if static:  # inputs live in fixed buffers: graphs and compiled code see the same addresses every step
            n, width = cache.num_slots, cache.max_len + 1
            self.tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            self.slots = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            self.key_mask = torch.ones(n, width, dtype=torch.bool, device=self.device)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, key length) shapes captured as CUDA graphs so far."""
        return sorted(self._graphs)

    def __call__(
        self, rows: list[int], last: torch.Tensor, positions: list[int], hidden: bool = False
    ) -> torch.Tensor:
        """Logits [len(rows), vocab] (the model's dtype) for the KV slots `rows`, each fed its token last[slot] (a
        device tensor [num_slots]: the engine's last pick per slot, never read by the host here) at positions.
        hidden (eager only): the final hidden states instead. Eagerly, the output layer runs on the given rows
        only (not on idle slots below the highest busy one)."""
        span = max(rows) + 1
        key_len = max(positions) + 1
        if self.static:
            batch = bucket(span, BATCH_BUCKETS, self.cache.num_slots)
            length = min(-(-key_len // LENGTH_BUCKET) * LENGTH_BUCKET, self.cache.max_len)
        else:
            batch, length = span, key_len
        pos = torch.zeros(batch, 1, dtype=torch.long)
        cpos = torch.full((batch, 1), self.cache.trash, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        self._fill(pos, cpos, mask, rows, positions)
        if not self.static:
            pos, cpos, mask = (t.to(self.device, non_blocking=True) for t in (pos, cpos, mask))
            cache = self.cache.rows(batch)
            every = rows == list(range(batch))
            out = decode_forward(self.model, cache, last[:batch, None], pos, cpos, mask, hidden or not every)
            if every:
                return out
            out = out[torch.tensor(rows, device=self.device)]
            return out if hidden else self.model.lm_head(out)
        self.tokens[:batch].copy_(last[:batch, None])
        self.positions[:batch].copy_(pos, non_blocking=True)
        self.slots[:batch].copy_(cpos, non_blocking=True)
        self.key_mask[:batch, :length].copy_(mask, non_blocking=True)
        logits = self._run_static(batch, length)
        return logits[torch.tensor(rows, device=self.device)]

    def _fill(self, pos, cpos, mask, rows, positions) -> None:
        """Host-side inputs: real rows attend to everything up to their position (causal does the rest); idle
        rows (their token is whatever their slot last picked) write to the spare column and see key 0 only."""
        idx = torch.tensor(rows)
        p = torch.tensor(positions)
        pos[idx, 0] = p
        cpos[idx, 0] = p
        mask[:, 0] = True
        mask[idx] = True

    def _args(self, batch: int, length: int):
        return (
            self.cache.rows(batch),
            self.tokens[:batch],
            self.positions[:batch],
            self.slots[:batch],
            self.key_mask[:batch, :length],
        )

    def _run_static(self, batch: int, length: int) -> torch.Tensor:
        if not self.graphs:
            if self._compiled is None:
                compiled = torch.compile(decode_forward, fullgraph=True, dynamic=False)
                self._compiled = compiled if self.compile else decode_forward
            return self._compiled(self.model, *self._args(batch, length))
        key = (batch, length)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, length)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, batch: int, length: int):
        """Record one decode step of this shape. The warm-up runs compute this step's real inputs, so their
        cache writes are the ones the replay makes again."""
        args = self._args(batch, length)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_forward(self.model, *args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = decode_forward(self.model, *args)
        self._pool = graph.pool()
        return graph, out
