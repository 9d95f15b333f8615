"""Attention of packed rows kept inside each document, without a [seq, seq] mask in memory.

Packed rows carry document ids; the model's own path turns them into a dense boolean mask for SDPA. In training
this module replaces it from outside the model, by swapping forwards on the instances as activation
checkpointing does: on CUDA FlexAttention with a block mask built from the document boundaries (blocks wholly
inside one document and below the diagonal run unmasked, blocks no document spans are skipped); on CPU causal
SDPA over each document's span in turn (FlexAttention has no backward on CPU in torch 2.13). Positions restart
at every document in both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from qwen15.model import positions_from_documents

BLOCK_SIZE = 128  # FlexAttention's tile (queries and keys)
BACKENDS = ("flex", "spans")


def default_backend(device: torch.device) -> str:
    """FlexAttention where it has a backward (CUDA); elsewhere "dense", the model's own dense document mask, as
    before this module. "spans" (SDPA per document, no mask; equal to dense within fp32 rounding, faster on long
    rows) is not the CPU default yet: a demo run on it ended at 175/200 held-out answers against the dense path's
    200/200 with the same seed, which rounding-level chaos may explain but no run here has shown."""
    return "flex" if device.type == "cuda" else "dense"


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] index of the first token of each token's document (a document: a run of equal ids)."""
    idx = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    return idx - positions_from_documents(document_ids)


def document_block_mask(document_ids: torch.Tensor, block_size: int = BLOCK_SIZE) -> BlockMask:
    """FlexAttention block mask of causal attention within documents, computed from the boundaries per block
    (O((seq / block)^2) booleans per row, never seq x seq). Token q may read token k when start(q) <= k <= q."""
    b, s = document_ids.shape
    starts = document_starts(document_ids)
    n = -(-s // block_size)
    first = torch.arange(n, device=document_ids.device) * block_size  # first token of each block
    last = torch.clamp(first + block_size, max=s) - 1
    start_first, start_last = starts[:, first], starts[:, last]  # [b, n]: starts of a query block's ends
    q_first, q_last = first[None, :, None], last[None, :, None]
    k_first, k_last = first[None, None, :], last[None, None, :]
    # Some pair of (query block i, key block j) is allowed: the keys [start(first q), last q] meet block j.
    some = (k_first <= q_last) & (k_last >= start_first[:, :, None])
    # Every pair is allowed: block j lies wholly before block i and after the start of its last query.
    full = (k_last <= q_first) & (k_first >= start_last[:, :, None])
    partial = some & ~full

    def blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = selected.sum(-1, dtype=torch.int32)[:, None]  # [b, 1 head, n]
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return count, order

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= starts[batch, q_idx])

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(s, s)
    )


@dataclass
class DocumentSpans:
    """[start, end) of each document of each row (host integers), for attention over one span at a time."""

    rows: list[list[tuple[int, int]]]

    @classmethod
    def of(cls, document_ids: torch.Tensor) -> DocumentSpans:
        s = document_ids.shape[1]
        change = torch.ones_like(document_ids, dtype=torch.bool)
        change[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        rows = []
        for row in change.cpu():
            starts = row.nonzero().flatten().tolist()
            rows.append(list(zip(starts, starts[1:] + [s], strict=True)))
        return cls(rows)


@torch.compiler.disable  # the spans are host integers: compiling over them would specialise on each row
def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: DocumentSpans) -> torch.Tensor:
    """Causal SDPA over each document span of each row; q, k, v [batch, heads, seq, head_dim]. Rows and spans are
    taken apart with unbind and split, whose backward writes each gradient once (a slice's would zero-fill the
    whole tensor for every span)."""
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for (qr, kr, vr), bounds in zip(zip(q.unbind(0), k.unbind(0), v.unbind(0)), spans.rows, strict=True):
        lengths = [e - a for a, e in bounds]
        parts = [
            F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, enable_gqa=gqa)[0]
            for qs, ks, vs in zip(
                qr.split(lengths, 1), kr.split(lengths, 1), vr.split(lengths, 1), strict=True
            )
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows)


_compiled_flex = None


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask
) -> torch.Tensor:
    """FlexAttention under the block mask; compiled on CUDA (eager FlexAttention computes the full scores)."""
    global _compiled_flex
    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)


def documents_of(document_ids: torch.Tensor, backend: str) -> BlockMask | DocumentSpans:
    if backend == "flex":
        return document_block_mask(document_ids)
    return DocumentSpans.of(document_ids)


def apply_document_attention(model: nn.Module, backend: str) -> None:
    """Before `parallelize`: attention of every block reads the documents of the row (passed by
    `pass_documents_to_blocks`) instead of a dense mask, and a forward with `document_ids` gets positions that
    restart per document and no dense mask. Inference calls (a KV cache, a padding mask) keep the model's path."""
    if backend not in BACKENDS:
        raise ValueError(f"document attention backend must be one of {BACKENDS}, got {backend!r}")
    state = _DocumentState()
    model._document_state = state
    for block in model.layers.values():
        attn = block.self_attn
        attn.forward = _attention_forward(attn, attn.forward)
    inner = model.forward

    def forward(input_ids, *, document_ids=None, position_ids=None, **kwargs):
        if (
            document_ids is None
            or kwargs.get("kv_cache") is not None
            or kwargs.get("key_padding_mask") is not None
        ):
            return inner(input_ids, document_ids=document_ids, position_ids=position_ids, **kwargs)
        if position_ids is None:
            position_ids = positions_from_documents(document_ids)
        state.current = documents_of(document_ids, backend)
        try:
            return inner(input_ids, position_ids=position_ids, **kwargs)
        finally:
            state.current = None

    model.forward = forward


def pass_documents_to_blocks(model: nn.Module) -> None:
    """After `parallelize`: each block receives the documents in its inputs, outside activation checkpointing,
    so that a recomputation in backward (after the forward has returned) sees the same documents."""
    state = model._document_state
    for block in model.layers.values():
        inner = block.forward

        def forward(x, inputs, _inner=inner):
            if state.current is not None:
                inputs = dataclasses.replace(inputs, mask=state.current)
            return _inner(x, inputs)

        block.forward = forward


class _DocumentState:
    """The documents of the forward in progress (None between forwards)."""

    current: BlockMask | DocumentSpans | None = None


def _attention_forward(attn: nn.Module, dense_forward):
    def forward(x, inputs):
        mask = inputs.mask
        if not isinstance(mask, BlockMask | DocumentSpans):
            return dense_forward(x, inputs)
        b, s, _ = x.shape
        q, k, v = attn.rotated_heads(x, inputs.cos, inputs.sin)
        if isinstance(mask, BlockMask):
            out = flex_document_attention(q, k, v, mask)
        else:
            out = span_attention(q, k, v, mask)
        return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    return forward
