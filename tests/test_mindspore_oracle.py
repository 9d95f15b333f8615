"""Files qwen15 writes load in real MindSpore with identical tensors.

Needs a Python with `mindspore` installed, named by QWEN15_MINDSPORE_PYTHON (e.g. a venv made with
`pip install mindspore`); skipped otherwise (CI relies on the committed fixtures, see test_mindspore_ckpt.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen15.cli import main
from qwen15.mindspore.ckpt import CkptFile, CkptWriter
from qwen15.mindspore.dtypes import f32_to_bf16
from qwen15.model_config import ModelConfig

from conftest import random_hf_model

MS_PYTHON = os.environ.get("QWEN15_MINDSPORE_PYTHON")
pytestmark = pytest.mark.skipif(
    not MS_PYTHON, reason="QWEN15_MINDSPORE_PYTHON (a Python with mindspore) not set"
)

LOAD = textwrap.dedent(
    """
    import json, sys, numpy as np, mindspore as ms
    out = {}
    for path, crc in json.loads(sys.argv[1]):
        for name, p in ms.load_checkpoint(path, crc_check=crc).items():
            if isinstance(p, str):
                continue
            if p.dtype == ms.bfloat16:
                arr = (p.astype(ms.float32).asnumpy().view(np.uint32) >> 16).astype(np.uint16)
            else:
                arr = p.asnumpy()
            out[path + "|" + name] = arr
    np.savez(sys.argv[2], **out)
    """
)


def mindspore_view(files: list[tuple[Path, bool]], tmp_path: Path) -> dict[str, np.ndarray]:
    arg = json.dumps([[str(p), crc] for p, crc in files])
    run = subprocess.run(
        [MS_PYTHON, "-c", LOAD, arg, str(tmp_path / "ms.npz")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(tmp_path / "ms.npz"))


def test_writer_files_load_in_mindspore(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": ("float32", rng.standard_normal((70, 9)).astype(np.float32)),
        "f16": ("float16", rng.standard_normal((33,)).astype(np.float16)),
        "bf16": ("bfloat16", f32_to_bf16(rng.standard_normal((40, 8)).astype(np.float32))),
        "i32": ("int32", np.array([1, -2, 3], np.int32)),
        "i64": ("int64", np.array(1 << 40, np.int64)),
        "u8": ("uint8", np.array([0, 255], np.uint8)),
        "b": ("bool", np.array([True, False, True])),
    }
    files = []
    for crc in (False, True):
        for slice_bytes in (1024, 512 << 20):
            path = tmp_path / f"w_{crc}_{slice_bytes}.ckpt"
            with CkptWriter(path, crc=crc, slice_bytes=slice_bytes) as w:
                for name, (dtype, arr) in tensors.items():
                    w.add(
                        name,
                        dtype,
                        arr.shape,
                        [arr[: len(arr) // 2], arr[len(arr) // 2 :]] if arr.ndim else [arr],
                    )
            files.append((path, crc))
    view = mindspore_view(files, tmp_path)
    for path, _ in files:
        for name, (_, arr) in tensors.items():
            got = view[f"{path}|{name}"]
            assert got.shape == arr.shape and got.tobytes() == arr.tobytes(), (path.name, name)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_converted_checkpoints_load_in_mindspore(tmp_path, dtype):
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)  # fmt: skip
    hf = random_hf_model(cfg, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    files = []
    for layout in (None, "interleaved"):
        out = tmp_path / f"{layout}.ckpt"
        extra = ["--qkv-layout", layout] if layout else []
        assert main(["convert", "--to", "mindspore", str(tmp_path / "hf"), str(out), "--dtype", dtype, "--crc",
                     "--quiet", *extra]) == 0  # fmt: skip
        files.append((out, True))
    view = mindspore_view(files, tmp_path)
    tdtype = getattr(torch, dtype)
    state = {k: v.to(tdtype) for k, v in hf.state_dict().items()}
    for path, _ in files:
        with CkptFile(path) as f:
            assert {k.split("|", 1)[1] for k in view if k.startswith(f"{path}|")} == set(f.tensors)
            for name, t in f.tensors.items():
                assert view[f"{path}|{name}"].tobytes() == t.read().tobytes(), name
    # and the unfused file's tensors are the transformers weights converted as torch converts them
    ref = state["model.layers.1.self_attn.q_proj.weight"].contiguous().view(torch.uint8).numpy()
    assert view[f"{files[0][0]}|model.layers.1.attention.wq.weight"].tobytes() == ref.tobytes()
