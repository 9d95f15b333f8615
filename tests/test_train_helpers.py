"""Helpers shared by the training tests (no tests here): tiny datasets, configs, an independent reference loop, and
running the trainer in 1..N processes (spawned, gloo, a temp-file rendezvous so parallel runs never collide)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
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


def reference_training(data: Path, steps: int | None = None, model=None, **changes):
    """The oracle: one plain process, the whole global batch in one forward, mean cross-entropy over unmasked
    labels, torch's AdamW with decay on matrices only, clip_grad_norm_. Returns (losses, final state dict)."""
    from qwen15 import Qwen, get_preset
    from qwen15.data.dataset import RowSampler, TokenDataset

    p = dict(BASE, **{k.replace("__", "."): v for k, v in changes.items()})
    steps = steps or p["train.steps"]
    ds = TokenDataset(data)
    sampler = RowSampler(len(ds), p["train.global_batch_size"], seed=p["data.seed"])
    if model is None:
        cfg = get_preset(p["model.preset"]).replace(vocab_size=p["model.vocab_size"])
        model = Qwen.from_config(cfg, seed=p["model.init_seed"])
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
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


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


# ---------------------------------------------------------------------------------------------- processes


def _worker(rank: int, world: int, init_file: str, jobs: list[list[str]], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from qwen15.train.config import load_config
        from qwen15.train.trainer import train

        results = []
        for args in jobs:
            result = train(load_config(None, args), echo=lambda m: None)
            results.append({"losses": result.losses, "checkpoint": str(result.last_checkpoint)})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def train_in_processes(world: int, jobs: list[list[str]]) -> list[dict]:
    """Run each job (a list of overrides) in `world` spawned processes; rank 0's results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(world, init_file, jobs, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())
