"""The process group: one process (`python -m qwen15 train`) or many (`torchrun`, one or many nodes), and the
collectives the trainer needs over the run's mesh (qwen15.parallel.layout.RunMesh)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qwen15.errors import UserError
from qwen15.parallel.launcher_watch import watch_launcher
from qwen15.parallel.layout import RunMesh


class DistributedError(UserError):
    """A launch or parallel layout that cannot work; the message says what to change."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool  # we created it, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join (or create) the default process group: NCCL on GPUs (gloo beside it for CPU tensors), gloo on CPU.

    Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says who we are; a
    plain single process gets a one-member group, so the same code runs in both cases. A process group that is
    already initialised (tests, notebooks) is used as it is.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("train.device is cuda but no GPU is visible; use --train.device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; start at most "
                "that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    owns = False
    watch_launcher()
    if not dist.is_initialized():
        owns = True
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, mesh: RunMesh | None = None, dim: str = "dp") -> torch.Tensor:
    """Sum over the mesh dimension `dim` (default: the data-parallel ranks), in place; returned for chaining."""
    group = None
    if mesh is not None:
        group = (mesh.dp if dim == "dp" else mesh[dim]).get_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (a decision one rank made, such as an error message)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
