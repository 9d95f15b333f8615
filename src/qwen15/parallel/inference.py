"""Tensor-parallel inference: one model split over N devices (torchrun --nproc-per-node N), for models that do not
fit one device or to cut the per-token latency of big ones.

Every rank runs the same generation loop on the same prompt; each computes its heads and MLP columns, keeps a KV
cache of its own heads only (the cache takes its shapes from the keys written), and gets the full logits of the
last position (one all-gather of [batch, 1, vocab] per step), so sampling with the same seed picks the same token
on every rank. No sequence parallelism here: decoding runs one token at a time.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from qwen15.parallel.tensor_parallel import apply_tensor_parallel


def shard_for_inference(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Split `model` over `tp_mesh` for generation, in place: q/k/v (with biases), gate, up column-parallel;
    o, down row-parallel (all-reduce); embedding and output layer split over the vocabulary, the logits gathered.
    The forward keeps its signature (KVCache, cache_positions, key_padding_mask, last_only) and returns plain
    full logits on every rank."""
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=False, loss_parallel=False)
    return model.eval()


def init_inference_mesh(device_type: str | None = None) -> DeviceMesh:
    """A one-dimensional "tp" mesh over all ranks of a torchrun launch (initialising the process group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from qwen15.parallel.launcher_watch import watch_launcher

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    watch_launcher()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def load_for_inference(
    folder: str, mesh: DeviceMesh, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """A Hugging Face folder loaded straight into its tensor-parallel split: the model is built on the meta
    device, split, and each rank copies only its slices from the memory-mapped safetensors (no rank ever holds
    the whole model). Same result as `shard_for_inference(Qwen.from_pretrained(folder), mesh)`."""
    from qwen15.hf_checkpoint import load_pretrained
    from qwen15.model import Qwen

    return load_pretrained(
        Qwen, folder, dtype=dtype, device=device, split=lambda model: shard_for_inference(model, mesh)
    )
