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


def micro_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor | None],
    global_targets: torch.Tensor,
    chunk_size: int = 0,
    compiled: bool = False,
) -> torch.Tensor:
    """Forward of one micro-batch and its share of the global token-mean loss (what its backward must see).
    `compiled`: the output projection and cross-entropy run compiled (not for vocabulary-split logits)."""
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
