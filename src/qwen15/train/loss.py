"""The training loss: token-mean cross-entropy over every unmasked label of the GLOBAL batch.

Each micro-batch contributes sum(CE over its unmasked labels) / (unmasked labels in the whole global batch), so
gradient accumulation plus FSDP's gradient sum give exactly the global mean however the tokens are spread: 1, 2
or 4 processes train identically. Vocabulary-split logits (tensor parallel) go to
qwen15.parallel.vocab_parallel_loss without being gathered. For long sequences the output projection and the
loss can run `chunk_size` tokens at a time, each chunk recomputed in backward, so only one chunk's logits exist;
with `train.compile` they run as one compiled graph that reads the logits once and keeps only the bf16 logits
and two fp32 numbers per token for backward (docs/training.md has the measurements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

from qwen15.model_config import IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of labels that carry loss (int64 scalar)."""
    return (labels != IGNORE_INDEX).sum()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over labels != IGNORE_INDEX, computed in fp32 (a bf16 log-softmax over 152k
    logits loses about two digits). Vocabulary-split logits (a DTensor) never get gathered."""
    if isinstance(logits, DTensor):
        from qwen15.parallel.vocab_parallel_loss import cross_entropy

        return cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def output_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cross_entropy_sum of the output projection `hidden @ weight.T`."""
    return cross_entropy_sum(F.linear(hidden, weight), labels)


_compiled_output_loss = None


def compiled_output_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """output_loss as one compiled graph (see the module's docstring); plain tensors only."""
    global _compiled_output_loss
    if _compiled_output_loss is None:
        _compiled_output_loss = torch.compile(output_loss, dynamic=False)
    return _compiled_output_loss(hidden, weight, labels)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int, compiled: bool = False
) -> torch.Tensor:
    """cross_entropy_sum(hidden @ weight.T, labels) computed `chunk_size` tokens at a time.

    Under tensor parallelism `weight` is the output layer's vocabulary shard (a DTensor) and `hidden` the final
    norm's output (a sequence-split DTensor, or a plain tensor replicated over the TP ranks): the hidden states
    are gathered whole, and each chunk's logits stay split over the vocabulary."""
    if isinstance(weight, DTensor):
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
        hidden = hidden.redistribute(placements=[Replicate()])
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    chunk_loss = compiled_output_loss if compiled and not isinstance(weight, DTensor) else output_loss
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)  # plain, also when hidden is a DTensor
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        total = total + checkpoint(chunk_loss, h, weight, y, use_reentrant=False)
    return total


_frozen_loss_buffers: dict = {}  # the last call's logits-sized work tensors (CPU), see _buffers


def _buffers(key: tuple, make) -> tuple[torch.Tensor, ...]:
    """The logits-sized work tensors of the frozen-output loss, kept from one step to the next on CPU: a fresh
    100 MB tensor costs a page fault per 4 KB page at its first write (30 ms here), as much as the pass itself.
    Only the latest shape is kept."""
    if key not in _frozen_loss_buffers:
        _frozen_loss_buffers.clear()
        _frozen_loss_buffers[key] = make()
    return _frozen_loss_buffers[key]


class _FrozenOutputCrossEntropy(torch.autograd.Function):
    """cross_entropy_sum(hidden @ weight.T, labels) / targets for an output layer that gets no gradient (LoRA):
    the hidden states' gradient is computed in the forward, a chunk of tokens at a time, so that neither the
    logits nor their softmax are kept for the backward, and the logits-sized passes of an autograd loss (fp32
    copy, log-softmax, its backward, the zeroed gradient) shrink to a few per chunk, in reused tensors. The
    values are those of the autograd loss: the same products, log-softmax and casts, in the same order."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, targets, chunk_size):
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype  # the logits' dtype
        h2, y2 = hidden.flatten(0, -2), labels.flatten()
        tokens, vocab = h2.shape[0], weight.shape[0]
        chunk = -(-tokens // -(-tokens // chunk_size))  # equal chunks: a short last one multiplies slowly
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad = torch.empty(h2.shape, dtype=hidden.dtype, device=device)
        scale = 1.0 / targets.clamp(min=1).float()

        def make():  # the logits in their dtype (bf16 only), their fp32 copy, the fp32 log-softmax
            low = torch.empty(chunk, vocab, dtype=dtype, device=device) if dtype != torch.float32 else None
            return low, torch.empty(chunk, vocab, device=device), torch.empty(chunk, vocab, device=device)

        # the caching allocator of a GPU reuses memory already
        low, logits32, logp = (
            _buffers((chunk, vocab, dtype, device), make) if device.type == "cpu" else make()
        )
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            for begin in range(0, tokens, chunk):
                h, y = h2[begin : begin + chunk].to(dtype), y2[begin : begin + chunk]
                n = h.shape[0]
                if low is None:
                    torch.mm(h, w.t(), out=logits32[:n])
                else:
                    logits32[:n].copy_(torch.mm(h, w.t(), out=low[:n]))
                torch.ops.aten._log_softmax.out(logits32[:n], -1, False, out=logp[:n])
                valid = y != IGNORE_INDEX
                rows = torch.arange(n, device=device)
                target = y.clamp(min=0)
                total = total - torch.where(valid, logp[rows, target], 0.0).sum()
                probs = logp[:n].exp_()
                probs[rows, target] -= 1.0
                probs.mul_((valid * scale)[:, None])  # before the cast, as autograd's gradient: the same bits
                if low is not None:
                    probs = low[:n].copy_(probs)
                grad[begin : begin + n] = torch.mm(probs, w).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).view(ctx.shape), None, None, None, None


# Without train.loss_chunk_size, the frozen-output loss takes as many tokens per chunk as keep its fp32
# log-softmax within this many bytes (441 tokens of the 151936-word vocabulary).
FROZEN_LOSS_CHUNK_BYTES = 256 * 2**20


def frozen_output_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 0,
) -> torch.Tensor:
    """The token-mean loss share of micro_batch_loss for a frozen, unsplit output layer (see
    _FrozenOutputCrossEntropy)."""
    chunk_size = chunk_size or max(1, FROZEN_LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
    return _FrozenOutputCrossEntropy.apply(hidden, weight, labels, targets, chunk_size)


def uses_frozen_output_loss(model: nn.Module, compiled: bool) -> bool:
    """The output layer gets no gradient and is a plain tensor (one process, LoRA), and the loss is not compiled."""
    head = getattr(model, "lm_head", None)
    if head is None or compiled:
        return False
    return not head.weight.requires_grad and not isinstance(head.weight, DTensor)


def micro_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor | None],
    global_targets: torch.Tensor,
    chunk_size: int = 0,
    compiled: bool = False,
) -> torch.Tensor:
    """Forward of one micro-batch and its share of the global token-mean loss (what its backward must see).
    `compiled`: the output projection and cross-entropy run compiled (not for vocabulary-split logits)."""
    if uses_frozen_output_loss(model, compiled):
        hidden = model(batch["input_ids"], document_ids=batch["document_ids"], return_hidden=True)
        return frozen_output_loss(hidden, model.lm_head.weight, batch["labels"], global_targets, chunk_size)
    if chunk_size:
        hidden = model(batch["input_ids"], document_ids=batch["document_ids"], return_hidden=True)
        ce = chunked_cross_entropy_sum(hidden, model.lm_head.weight, batch["labels"], chunk_size, compiled)
    elif compiled and not isinstance(model.lm_head.weight, DTensor):
        hidden = model(batch["input_ids"], document_ids=batch["document_ids"], return_hidden=True)
        ce = compiled_output_loss(hidden, model.lm_head.weight, batch["labels"])
    else:
        logits = model(batch["input_ids"], document_ids=batch["document_ids"])
        ce = cross_entropy_sum(logits, batch["labels"])
    return ce / global_targets.clamp(min=1)
