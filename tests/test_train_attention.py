"""Training-time attention and recomputation: document masking of packed rows without a dense mask (the span
path on CPU, FlexAttention's block mask checked against the dense mask), and selective activation checkpointing
(gradients as without checkpointing, activations kept between none and full, as the memory model counts)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from qwen15.model import Qwen
from qwen15.model_config import IGNORE_INDEX, get_preset
from qwen15.parallel.memory import layer_activation_bytes
from qwen15.parallel.parallelize import apply_activation_checkpointing
from qwen15.train.document_attention import (
    DocumentSpans,
    apply_document_attention,
    document_block_mask,
    document_starts,
    pass_documents_to_blocks,
)

CONFIG = get_preset("tiny-gqa").replace(vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
LENGTHS = [7, 12, 5]  # three documents, then 4 tokens of padding (its own id, no loss)
PAD = 4
# FlexAttention (CUDA only: no backward on CPU) over several 128-token tiles: full, partial and skipped ones.
CUDA_LENGTHS, CUDA_PAD = [300, 40, 411, 150], 3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")


def model(seed: int = 0, device: str = "cpu") -> Qwen:
    torch.manual_seed(seed)
    return Qwen.from_config(CONFIG, seed=seed, device=device)


def documents(lengths: list[int] = LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen) for n in lengths]


def packed(docs: list[torch.Tensor], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, document ids) [1, seq] of the documents packed in one row as the data pipeline packs
    them: the label that crosses into the next document carries no loss, nor does padding."""
    ids = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])
    doc_ids = torch.repeat_interleave(
        torch.arange(len(docs) + 1), torch.tensor([len(d) for d in docs] + [pad])
    )
    labels = torch.full_like(ids, IGNORE_INDEX)
    at = 0
    for d in docs:
        labels[at : at + len(d) - 1] = d[1:]
        at += len(d)
    return ids[None], labels[None], doc_ids[None]


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def separately(docs: list[torch.Tensor], device: str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The oracle: each document on its own through the plain model (positions from 0, plain causal)."""
    m = model(device=device)
    total = 0
    for d in docs:
        d = d.to(device)
        total = total + ce_sum(m(d[None]), torch.cat([d[1:], d.new_tensor([IGNORE_INDEX])])[None])
    total.backward()
    return total.detach(), grads(m)


@pytest.mark.parametrize(
    "backend, checkpointing",
    [
        ("spans", False),
        ("spans", True),
        ("spans", "selective"),
        pytest.param("flex", False, marks=CUDA),
        pytest.param("flex", "selective", marks=CUDA),
    ],
    ids=str,
)
def test_packed_row_with_document_masking_equals_each_document_alone(backend, checkpointing):
    torch.manual_seed(0)
    device = "cuda" if backend == "flex" else "cpu"
    docs = documents(CUDA_LENGTHS) if backend == "flex" else documents()
    ids, labels, doc_ids = (t.to(device) for t in packed(docs, CUDA_PAD if backend == "flex" else PAD))
    m = model(device=device)
    apply_document_attention(m, backend)
    if checkpointing:
        apply_activation_checkpointing(m, checkpointing)  # recomputation runs after the forward has returned
    pass_documents_to_blocks(m)
    loss = ce_sum(m(ids, document_ids=doc_ids), labels)
    loss.backward()
    ref_loss, ref_grads = separately(docs, device)
    tol = 1e-5 if device == "cpu" else 1e-4  # CUDA: another kernel on each side (flash / flex) in fp32
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=tol / 10, atol=tol)
    got = grads(m)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, rtol=tol, atol=tol, msg=name)  # gradients up to ~8
    # The same row without document ids attends across documents: another loss (so the check above can fail).
    with torch.no_grad():
        across = ce_sum(m(ids), labels)
    assert abs(float(across) - float(ref_loss)) > 1e-3


def test_positions_restart_and_spans_follow_the_document_ids():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert document_starts(doc_ids).tolist() == [[0, 0, 0, 3, 3, 5, 5, 5, 5], [0] * 9]
    assert DocumentSpans.of(doc_ids).rows == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]


def test_the_model_path_is_kept_for_inference_calls():
    """A KV cache or a padding mask goes to the model's own attention (the swap touches packed training only)."""
    m, ref = model(), model()
    apply_document_attention(m, "spans")
    pass_documents_to_blocks(m)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6))
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    with torch.no_grad():
        torch.testing.assert_close(m(ids, key_padding_mask=pad), ref(ids, key_padding_mask=pad))
        torch.testing.assert_close(m(ids), ref(ids))


def test_document_block_mask_classifies_blocks_as_the_dense_mask_does():
    """Each (query block, key block) of the FlexAttention mask: skipped where the dense causal-within-document
    mask is empty, unmasked ("full") where it is all true, masked by mask_mod in between; a length that is not a
    multiple of the block size; and FlexAttention under it (eager, forward: CPU has no backward) = dense SDPA."""
    gen = torch.Generator().manual_seed(1)
    s, block = 200, 16
    doc_ids = torch.cumsum(torch.rand(2, s, generator=gen) < 0.04, dim=1)
    dense = (doc_ids[:, :, None] == doc_ids[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    mask = document_block_mask(doc_ids, block)
    n = -(-s // block)
    padded = torch.zeros(2, n * block, n * block, dtype=torch.bool)
    padded[:, :s, :s] = dense
    tiles = padded.view(2, n, block, n, block).transpose(2, 3)
    some, every = tiles.any((-1, -2)), tiles.flatten(-2).all(-1)
    # Tiles cut by the sequence end count as full when their real part is (flex masks the padding itself).
    real = torch.zeros(n * block, n * block, dtype=torch.bool)
    real[:s, :s] = True
    real = real.view(n, block, n, block).transpose(1, 2)
    every = ((tiles | ~real).flatten(-2).all(-1)) & some

    def selected(num, idx):
        out = torch.zeros(2, n, n, dtype=torch.bool)
        for b in range(2):
            for i in range(n):
                out[b, i, idx[b, 0, i, : num[b, 0, i]].long()] = True
        return out

    full = selected(mask.full_kv_num_blocks, mask.full_kv_indices)
    partial = selected(mask.kv_num_blocks, mask.kv_indices)
    assert full.any() and partial.any() and (~(full | partial)).any()
    assert torch.equal(full, every)
    assert torch.equal(partial, some & ~every)

    from qwen15.train.document_attention import flex_document_attention

    q, k, v = (torch.randn(2, 4, s, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        got = flex_document_attention(q, k[:, :2], v[:, :2], document_block_mask(doc_ids))
    want = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], attn_mask=dense[:, None], enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def kept_bytes(fn) -> int:
    """Bytes allocated while fn() runs and still alive after it (CPU allocator, from the profiler's records):
    what a forward leaves for its backward, besides its result. Saved-tensor hooks cannot see this under
    checkpointing: non-reentrant checkpoint installs its own hooks inside the region, and selective checkpointing
    keeps its saved outputs in a cache of its own."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_selective_checkpointing_keeps_between_none_and_full_with_the_same_gradients():
    cfg = CONFIG.replace(num_hidden_layers=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    kept, got = {}, {}
    for mode in (False, "selective", True):
        torch.manual_seed(0)
        m = Qwen.from_config(cfg, seed=0)
        if mode:
            apply_activation_checkpointing(m, mode)
        hidden = []
        kept[mode] = kept_bytes(lambda m=m, hidden=hidden: hidden.append(m(ids, return_hidden=True)))
        hidden[0].square().mean().backward()
        got[mode] = grads(m)
    for mode in ("selective", True):
        for name, g in got[False].items():
            torch.testing.assert_close(got[mode][name], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
    assert kept[True] < kept["selective"] < kept[False], kept
    # The memory model's selective term: what the two layers keep beyond full checkpointing.
    tokens, layers = ids.numel(), cfg.num_hidden_layers
    est = layers * (
        layer_activation_bytes(cfg, tokens, 4, activation_checkpointing="selective")
        - layer_activation_bytes(cfg, tokens, 4, activation_checkpointing=True)
    )
    measured = kept["selective"] - kept[True]
    print(f"selective kept {kept}; beyond full: measured {measured}, estimated {est}")
    assert measured == pytest.approx(est, rel=0.05)


def test_selective_checkpointing_mode_is_checked():
    with pytest.raises(ValueError, match="selective"):
        apply_activation_checkpointing(copy.deepcopy(model()), "sometimes")


def test_trainer_document_mask_setting(tmp_path):
    """train.document_mask: null (default) masks packed rows like the model's dense-mask path, false attends
    across documents (positions running on), true on rows without documents is an error naming the key."""
    from train_helpers import make_dataset, overrides

    from qwen15.train.config import TrainConfigError, load_config
    from qwen15.train.trainer import Trainer

    packed_data, pad_data = make_dataset(tmp_path / "pack", "pack"), make_dataset(tmp_path / "pad", "pad")
    losses = {}
    for setting in (None, False):
        args = overrides(packed_data, tmp_path / f"run-{setting}", train__document_mask=setting)
        trainer = Trainer(load_config(None, args), echo=lambda m: None)
        try:
            batch = trainer.dataset.batch(list(range(8)))
            if setting is False:  # a plain model (nothing swapped), with the weights before the step
                oracle = copy.deepcopy(trainer.model)
            losses[setting] = trainer.train_step(batch)["loss"]
        finally:
            trainer.close()
        assert trainer.document_mask == (setting is None)
    with torch.no_grad():
        dense = oracle(batch["input_ids"], document_ids=batch["document_ids"])
        across = oracle(batch["input_ids"])
    mean = lambda logits: float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))  # noqa: E731
    assert losses[None] == pytest.approx(mean(dense), rel=1e-6)
    assert losses[False] == pytest.approx(mean(across), rel=1e-6)
    assert abs(losses[None] - losses[False]) > 1e-4
    with pytest.raises(
        TrainConfigError, match=r"--train.document_mask: train.document_mask is true .*layout pack"
    ):
        Trainer(load_config(None, overrides(pad_data, tmp_path / "run-pad", train__document_mask=True)))
