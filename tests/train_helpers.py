"""Helpers shared by the training tests (no tests here): tiny datasets, configs, an independent reference loop, and
running the trainer in 1..N processes (spawned, gloo, a temp-file rendezvous so parallel runs never collide)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VOCAB = 256
SEQ = 32


def random_documents(n: int, seed: int, vocab: int = VOCAB, lo: int = 4, hi: int = 30):
    """Documents of random ids; about a third of each document's tokens carry no loss (prompt-like masking)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        ids = rng.integers(0, vocab, length).tolist()
        mask = (rng.random(length) > 0.33).tolist()
        docs.append((ids, mask))
    return docs


def make_dataset(folder: Path, layout: str, n_docs: int = 120, seed: int = 0, seq: int = SEQ) -> Path:
    from qwen15.data.writer import write_documents

    docs = random_documents(n_docs, seed)
    return write_documents(folder, docs, seq_length=seq, layout=layout, type="chat", vocab_size=VOCAB)


BASE = {
    "model.preset": "tiny",
    "model.vocab_size": VOCAB,
    "model.init_seed": 3,
    "train.steps": 4,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 2,
    "optim.lr": 3e-3,
    "optim.min_lr": 3e-4,
    "optim.warmup_steps": 2,
    "optim.weight_decay": 0.1,
    "optim.clip_grad_norm": 1.0,
    "data.seed": 7,
    "metrics.plot": False,
    "metrics.tensorboard": False,
}


def overrides(data: Path, run_dir: Path, *, drop: tuple[str, ...] = (), **changes) -> list[str]:
    """`--key value` pairs of BASE with changes (double underscore for the dot), minus the keys in `drop`."""
    values = dict(BASE, **{"data.path": str(data), "train.run_dir": str(run_dir)})
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    for key in drop:
        values.pop(key)
    out = []
    for k, v in values.items():
        out += [f"--{k}", "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def config(data: Path, run_dir: Path, **changes):
    from qwen15.train.config import load_config

    return load_config(None, overrides(data, run_dir, **changes))


def schedule(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup to lr, then half a cosine period down to min_lr at the last step (written out separately
    from qwen15.train.optim on purpose)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup - 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


@contextlib.contextmanager
def deterministic(threads: int = 1):
    """Run an oracle the same way in every process and on every machine: a fixed intra-op thread count (how a
    parallel kernel splits its work, and so its fp32 summation order, follows the thread count, which otherwise
    defaults to the cores this process may use), and deterministic algorithms only."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


@dataclass
class Reference:
    """What the reference loop computed: the loss of each step, the final and the initial weights."""

    losses: list[float]
    state: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]


def reference_training(data: Path, steps: int | None = None, model=None, **changes) -> Reference:
    """The oracle: one plain process, the whole global batch in one forward, mean cross-entropy over unmasked
    labels, torch's AdamW with decay on matrices only, clip_grad_norm_ (one thread, deterministic algorithms)."""
    with deterministic():
        return _reference_training(data, steps, model, **changes)


def _reference_training(data: Path, steps: int | None, model, **changes) -> Reference:
    from qwen15 import Qwen, get_preset
    from qwen15.data.dataset import RowSampler, TokenDataset

    p = dict(BASE, **{k.replace("__", "."): v for k, v in changes.items()})
    steps = steps or p["train.steps"]
    ds = TokenDataset(data)
    sampler = RowSampler(len(ds), p["train.global_batch_size"], seed=p["data.seed"])
    if model is None:
        cfg = get_preset(p["model.preset"]).replace(vocab_size=p["model.vocab_size"])
        model = Qwen.from_config(cfg, seed=p["model.init_seed"])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [q for q in params if q.ndim >= 2], "weight_decay": p["optim.weight_decay"]},
            {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0},
        ],
        lr=p["optim.lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    losses = []
    for step in range(steps):
        b = ds.batch(sampler.next_batch())
        logits = model(b["input_ids"], document_ids=b["document_ids"])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, p["optim.clip_grad_norm"])
        for g in opt.param_groups:
            g["lr"] = schedule(
                step, p["train.steps"], p["optim.lr"], p["optim.min_lr"], p["optim.warmup_steps"]
            )
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return Reference(losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, initial)


# Tolerances of a trainer run against the reference loop, set from the differences measured over repeated runs of
# every equivalence test in fresh processes (tests/repeat_equivalence.py; the first loop, 14 runs on a busy machine:
# 17 comparisons, each giving one result per side in every run). The only differences are fp32 summation orders (micro-batches accumulated, gradients
# reduced across ranks, row-parallel partial sums): losses differed by <= 2.5e-7 relative, the update (final -
# initial weights, over all tensors) by <= 3.8e-5 relative to the reference update, one weight by <= 5.1e-5. A
# second 20-run loop on a quiet machine (2026-12-01) found the trainer side (2 threads; the oracle runs on 1)
# taking another summation order in about 1 of 10 fresh processes: the update then differed by <= 5.9e-5, one
# weight by 1.24e-4, hence the weight bound of 2.5e-4. The update is the sensitive check: weight decay alone is
# 0.3% of it, while the largest difference of one weight (Adam's 1/sqrt(v) magnifies the rounding of near-zero
# gradients up to a fraction of one lr step) cannot tell a missing decay from noise (test_train_mutations.py:
# 8.3e-5 without decay).
LOSS_RTOL = 1e-6
UPDATE_RTOL = 5e-4
WEIGHT_ATOL = 2.5e-4


def differences(losses: list[float], weights: dict[str, torch.Tensor], ref: Reference) -> dict[str, float]:
    """The largest relative loss difference, the relative error of the update and the largest weight difference."""
    assert len(losses) == len(ref.losses), (len(losses), len(ref.losses))
    assert set(weights) == set(ref.state), set(weights) ^ set(ref.state)
    error = sum(float((weights[k].double() - ref.state[k].double()).pow(2).sum()) for k in ref.state)
    update = sum(float((ref.state[k].double() - ref.initial[k].double()).pow(2).sum()) for k in ref.state)
    return {
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref.losses)),
        "update_rel": math.sqrt(error / update),
        "weight_abs": max_abs_diff(weights, ref.state),
    }


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(state[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def assert_matches_reference(losses: list[float], weights: dict[str, torch.Tensor], ref: Reference) -> None:
    """The shared check of every equivalence test (and of the mutation tests, which expect it to fail). Prints
    the differences, and appends them with hashes of both sides to $QWEN15_EQUIVALENCE_LOG when set (the repeat
    script reads it)."""
    d = differences(losses, weights, ref)
    record = dict(d, test=os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0])
    record.update(trainer=state_hash(weights), reference=state_hash(ref.state))
    print("equivalence", json.dumps(record))
    log = os.environ.get("QWEN15_EQUIVALENCE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    assert d["loss_rel"] <= LOSS_RTOL, (
        f"losses differ by {d['loss_rel']:.3g} relative: {losses} vs {ref.losses}"
    )
    assert d["update_rel"] <= UPDATE_RTOL, f"the update differs by {d['update_rel']:.3g} relative"
    assert d["weight_abs"] <= WEIGHT_ATOL, f"a weight differs by {d['weight_abs']:.3g}"


def assert_run_matches_reference(result, ref: Reference) -> None:
    """assert_matches_reference for a TrainResult or a rank-0 result dict of train_in_processes."""
    if isinstance(result, dict):
        losses, checkpoint = result["losses"], Path(result["checkpoint"])
    else:
        losses, checkpoint = result.losses, result.last_checkpoint
    assert_matches_reference(losses, checkpoint_weights(checkpoint), ref)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a training checkpoint, read with DCP (any process count wrote it)."""
    import torch.distributed.checkpoint as dcp

    from qwen15 import Qwen
    from qwen15.model_config import ModelConfig

    cfg = ModelConfig.from_json_file(checkpoint / "config.json")
    with torch.device("meta"):
        model = Qwen(cfg)
    state = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(checkpoint / "state"), no_dist=True)
    return state


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------- mutations
# Deliberate bugs of the trainer, applied from outside (set(module, name, value) is monkeypatch.setattr in the test
# process, plain setattr in a spawned worker): test_train_mutations.py checks that assert_matches_reference
# rejects each one.


def _no_weight_decay(set_attr) -> None:
    from qwen15.train import trainer as T

    real = T.build_optimizer

    def build(model, cfg):
        optimizer = real(model, cfg)
        for group in optimizer.param_groups:
            group["weight_decay"] = 0.0
        return optimizer

    set_attr(T, "build_optimizer", build)


def _no_clipping(set_attr) -> None:
    from qwen15.train import trainer as T

    real = T.clip_grad_norm
    set_attr(T, "clip_grad_norm", lambda parts, max_norm, pp_group=None: real(parts, 0.0, pp_group))


def _skip_a_micro_batch(set_attr) -> None:
    from qwen15.train import trainer as T

    real = T.forward_backward
    set_attr(T, "forward_backward", lambda model, micro, *a, **k: real(model, micro[:-1], *a, **k))


def _mean_per_micro_batch(set_attr) -> None:
    """Each micro-batch's loss normalised by its own labels (the mean of micro-batch means)."""
    from qwen15.train import trainer as T
    from qwen15.train.loss import count_targets

    real, micro = T.micro_batch_loss, BASE["train.global_batch_size"] // BASE["train.micro_batch_size"]
    set_attr(
        T, "micro_batch_loss", lambda m, mb, targets, *a: real(m, mb, count_targets(mb["labels"]) * micro, *a)
    )


def _local_normalisation(set_attr) -> None:
    """The loss normalised by this rank's labels instead of the global batch's (the same as the right one on one
    process)."""
    from qwen15.train import trainer as T
    from qwen15.train.loss import count_targets

    real = T.forward_backward

    def local(model, micro, targets, *a, **k):
        return real(model, micro, sum(count_targets(mb["labels"]) for mb in micro), *a, **k)

    set_attr(T, "forward_backward", local)


MUTATIONS = {
    "no weight decay": _no_weight_decay,
    "no clipping": _no_clipping,
    "skip a micro-batch": _skip_a_micro_batch,
    "loss mean per micro-batch": _mean_per_micro_batch,
    "loss normalised per rank": _local_normalisation,
}


# ---------------------------------------------------------------------------------------------- processes


def _worker(
    rank: int, world: int, init_file: str, jobs: list[list[str]], out: str, mutations: list[str | None]
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from qwen15.train import trainer as T
        from qwen15.train.config import load_config
        from qwen15.train.trainer import train

        results = []
        for args, mutation in zip(jobs, mutations, strict=True):
            saved = dict(vars(T))
            if mutation is not None:
                MUTATIONS[mutation](setattr)
            try:
                result = train(load_config(None, args), echo=lambda m: None)
            finally:
                for name in ("build_optimizer", "clip_grad_norm", "forward_backward", "micro_batch_loss"):
                    setattr(T, name, saved[name])
            results.append({"losses": result.losses, "checkpoint": str(result.last_checkpoint)})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def train_in_processes(
    world: int, jobs: list[list[str]], mutations: list[str | None] | None = None
) -> list[dict]:
    """Run each job (a list of overrides) in `world` spawned processes, each with its entry of `mutations` (a
    name in MUTATIONS, or None) applied to the trainer; rank 0's results."""
    import torch.multiprocessing as mp

    mutations = mutations or [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(world, init_file, jobs, out, mutations), nprocs=world, join=True)
        return json.loads(Path(out).read_text())
