"""`qwen15 generate` and `qwen15 chat --predict-data` under `torchrun --nproc-per-node 2` (gloo on CPU): the model is
split across the two processes, rank 0 prints, the other stays silent, and the greedy output is identical to the
single-process command's output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_TOKENIZER, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny tied model (0.5B-like: the embedding and output layer are one tensor, split over the vocabulary)
    with the real tokenizer; biases and norms non-trivial so that a mis-split shows in the tokens."""
    import torch

    from qwen15 import Qwen, Tokenizer, get_preset

    folder = tmp_path_factory.mktemp("tp-model")
    model = Qwen.from_config(get_preset("tiny"), seed=11)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.mul_(5.0)  # sharper distributions: no near-ties between the top tokens
    model.save_pretrained(folder, tokenizer=Tokenizer.from_pretrained(SHARED_TOKENIZER))
    return folder


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), "-m", "qwen15.cli", *args]
    else:
        cmd = [sys.executable, "-m", "qwen15.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_generate_and_chat_split_over_two_processes_match_one(model_dir):
    common = ["--model", str(model_dir), "--device", "cpu", "--greedy", "--max-new-tokens", "16"]
    generate = ["generate", *common, "--prompt", "The capital of France is", "--prompt", "1, 2, 3,"]
    chat = ["chat", *common, "--predict-data", "你好", "Tell me a story."]
    for args in (generate, chat):
        single = _run(args, 1)
        split = _run(args, 2)
        assert split.stdout == single.stdout
        assert split.stdout.strip()  # something was generated, printed once (rank 0 only)
        assert "tensor parallel over 2 processes" in split.stderr
        assert split.stderr.count("loaded ") == 1  # rank 1 printed nothing
