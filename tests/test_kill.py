"""kill -9 from outside, at work: training mid-run and mid-checkpoint, `data preprocess`, `convert`. Afterwards
nothing half-written is in sight, nothing that existed is lost, and the next start resumes (training: exactly, to
the bit) or redoes the work (the others: the same bytes as an uninterrupted run) and removes the leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_fixtures as fx
import torch

from qwen15.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return fx.artifacts(tmp_path_factory.mktemp("kill"), rows=200)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qwen15.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"ended before the kill: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line cut short by the kill
            out.append(json.loads(line)["step"])
    return out


def visible_checkpoints_are_complete(ckpts: Path) -> list[str]:
    names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert all((ckpts / n / "COMPLETE").is_file() for n in names), names
    return names


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from train_helpers import checkpoint_weights

    return checkpoint_weights(checkpoint)


@pytest.mark.parametrize("moment", ["mid-run", "mid-checkpoint"])
def test_training_killed_resumes_exactly(art, tmp_path, moment):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = ["train", *fx.train_overrides(art["data"], run, art["tok"], art["vocab"], train__steps=12,
                                         checkpoint__every=4, checkpoint__keep=2)]  # fmt: skip
    if moment == "mid-run":  # between checkpoints: steps 5 and 6 done, step 8 not yet saved
        kill_when(
            start(args), lambda: len(metrics_steps(run)) >= 6 and not (ckpts / "step-00000008").exists()
        )
    else:  # while the step-8 checkpoint is being written (its partial folder exists, not yet renamed)
        kill_when(start(args), lambda: any(ckpts.glob(".step-00000008.partial/state/*")))
    assert visible_checkpoints_are_complete(ckpts)[-1] == "step-00000004"
    assert main(args) == 0
    assert not list(ckpts.glob(".step-*")) and visible_checkpoints_are_complete(ckpts)[-1] == "step-00000012"
    assert metrics_steps(run) == list(range(1, 13))
    straight = tmp_path / "straight"
    assert main(["train", *fx.train_overrides(art["data"], straight, art["tok"], art["vocab"], train__steps=12,
                                               checkpoint__every=4)]) == 0  # fmt: skip
    a, b = weights(ckpts / "step-00000012"), weights(straight / "checkpoints" / "step-00000012")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda r: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(run) == losses(straight)


def test_preprocess_killed_leaves_the_old_output_and_the_next_run_cleans_up(art, tmp_path):
    text = tmp_path / "big.txt"
    text.write_text(("\n".join(fx.TEXTS) + "\n\n") * 6000)
    out = tmp_path / "ds"
    pre = ["data", "preprocess", "--type", "text", "--input", str(text), "--tokenizer", str(art["tok"]),
           "--seq-length", "16", "--output", str(out), "--quiet"]  # fmt: skip
    small = tmp_path / "small.txt"
    small.write_text(fx.TEXTS[0] * 4)
    assert main([*pre[:5], str(small), *pre[6:]]) == 0  # an earlier output, to be replaced with --overwrite
    before = fx.tree(out)
    kill_when(start([*pre, "--overwrite"]), lambda: any(tmp_path.glob(".ds.*.partial/tokens.npy")))
    assert fx.tree(out) == before  # the old output is whole
    leftovers = list(tmp_path.glob(".ds.*.partial"))
    assert len(leftovers) == 1
    assert main([*pre, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".ds.*")), "the killed run's partial folder is removed"
    fresh = tmp_path / "fresh"
    assert main([*pre[:-2], str(fresh), "--quiet"]) == 0
    for name in ("tokens.npy", "loss_mask.npy"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()


def test_convert_killed_leaves_nothing_in_sight_and_the_next_run_cleans_up(art, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *fx.train_overrides(art["data"], run, art["tok"], art["vocab"], train__steps=1,
                                               model__hidden_size=128, model__intermediate_size=512,
                                               model__num_hidden_layers=4)]) == 0  # fmt: skip
    out = tmp_path / "hf"
    conv = ["convert", "--to", "hf", str(run), str(out), "--max-shard-size", "20KB", "--dtype", "float32"]
    kill_when(start(conv), lambda: len(list(tmp_path.glob(".hf.*.partial/model-*.safetensors"))) >= 2)
    assert not out.exists() and len(list(tmp_path.glob(".hf.*.partial"))) == 1
    assert main(conv) == 0
    assert not list(tmp_path.glob(".hf.*"))
    fresh = tmp_path / "fresh"
    assert main([*conv[:4], str(fresh), *conv[5:]]) == 0
    files = lambda f: {k: v for k, v in fx.tree(f).items() if k != ".qwen15-output.json"}  # noqa: E731
    assert files(out) == files(fresh)
