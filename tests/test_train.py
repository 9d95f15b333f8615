"""Training on one process: recipes and overrides, schedule, loss, equality with an independent reference loop,
exact resume, a crash while saving, NaN handling, metrics files."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    BASE,
    assert_run_matches_reference,
    checkpoint_weights,
    config,
    make_dataset,
    max_abs_diff,
    overrides,
    reference_training,
    schedule,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- recipes


def test_every_shipped_recipe_parses_and_validates():
    from qwen15.model_config import get_preset
    from qwen15.train.config import load_config

    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    names = {p.stem for p in recipes}
    sizes = ["0.5b", "1.8b", "4b", "7b", "14b", "32b", "72b", "110b"]
    assert {f"finetune_{s}" for s in sizes} <= names
    assert {"pretrain_7b", "pretrain_14b", "pretrain_72b", "tiny"} <= names
    for path in recipes:
        cfg = load_config(path)
        if cfg.model.preset:
            get_preset(cfg.model.preset)
        header = path.read_text().split("model:")[0]
        m = re.search(r"(\d+) node\(s\) x 8 GPUs", header)
        if m:  # the batch must split over the GPUs the recipe is written for
            gpus = int(m.group(1)) * 8
            assert cfg.train.global_batch_size % (gpus * cfg.train.micro_batch_size) == 0, path.name
            assert cfg.data.seq_length in (4096, 8192, 32768), path.name
            if cfg.train.mode == "finetune":
                assert cfg.optim.lr == 1e-6 and cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-8
            assert cfg.optim.weight_decay == 0.01 and cfg.optim.clip_grad_norm == 1.0
    assert load_config(ROOT / "configs/pretrain_7b.yaml").data.seq_length == 32768


def test_a_model_given_on_the_command_line_replaces_the_recipes():
    """`--config tiny --model.path DIR`: the tiny recipe names a preset; the command line's folder wins."""
    from qwen15.train.config import TrainConfigError, load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", ["--model.path", "some/folder", "--train.mode", "finetune"])
    assert cfg.model.path == "some/folder" and cfg.model.preset is None
    cfg = load_config(
        ROOT / "configs/finetune_7b.yaml", ["--model.preset", "tiny", "--train.mode", "pretrain"]
    )
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    with pytest.raises(TrainConfigError, match="exactly one"):  # both on the command line: still refused
        load_config(ROOT / "configs/tiny.yaml", ["--model.path", "x", "--model.preset", "tiny"])


def test_unknown_and_ill_typed_keys_name_the_key_and_line(tmp_path):
    from qwen15.train.config import TrainConfigError, load_config

    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  preset: tiny\ndata:\n  path: x\noptim:\n  lr: 1e-4\n  lrr: 3\n")
    with pytest.raises(TrainConfigError, match=r"r\.yaml:7: unknown key 'optim\.lrr'"):
        load_config(bad)
    bad.write_text("model:\n  preset: tiny\ndata:\n  path: x\ntrain:\n  steps: ten\n")
    with pytest.raises(TrainConfigError, match=r"r\.yaml:6: train\.steps must be an integer, got 'ten'"):
        load_config(bad)
    bad.write_text("model:\n  preset: tiny\ndata:\n  path: x\ntrainer:\n  steps: 1\n")
    with pytest.raises(TrainConfigError, match=r"r\.yaml:5: unknown section 'trainer'"):
        load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("model:\n  preset: tiny\ndata:\n  path: x\noptim:\n  lr: 1e-4\n")
    cfg = load_config(good, ["--optim.lr", "2e-5", "--train.steps=7", "--optim.betas", "[0.8, 0.9]"])
    assert cfg.optim.lr == 2e-5 and cfg.train.steps == 7 and cfg.optim.betas == [0.8, 0.9]
    with pytest.raises(TrainConfigError, match=r"--optim\.warmup: unknown key 'optim\.warmup'"):
        load_config(good, ["--optim.warmup", "3"])
    with pytest.raises(TrainConfigError, match=r"--train\.compile: train\.compile must be true or false"):
        load_config(good, ["--train.compile", "maybe"])
    with pytest.raises(TrainConfigError, match="train.mode must be one of pretrain, finetune"):
        load_config(good, ["--train.mode", "sft"])
    with pytest.raises(TrainConfigError, match="needs a value"):
        load_config(good, ["--train.steps"])
    with pytest.raises(
        TrainConfigError, match="global_batch_size 6 is not a multiple of train.micro_batch_size 4"
    ):
        load_config(good, ["--train.global_batch_size", "6", "--train.micro_batch_size", "4"])
    with pytest.raises(TrainConfigError, match="exactly one of model.preset"):
        load_config(good, ["--model.path", "somewhere", "--model.config", "c.json"])


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    from qwen15.cli import main

    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  preset: tiny\ndata:\n  path: x\noptim:\n  learning_rate: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:6: unknown key 'optim.learning_rate'" in err and "Traceback" not in err
    assert main(["train", "--config", "tiny", "--print-config", "--train.steps", "3"]) == 0
    assert "steps: 3" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- pieces


def test_schedule_warmup_then_cosine_to_minimum():
    from qwen15.train.config import OptimSection
    from qwen15.train.optim import lr_at

    cfg = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    for s in (0, 5, 10, 37, 99):
        assert lrs[s] == pytest.approx(schedule(s, 100, 1e-3, 1e-4, 10), rel=1e-12)


def test_no_weight_decay_on_norms_and_biases():
    from qwen15 import Qwen, get_preset
    from qwen15.train.optim import param_groups

    model = Qwen(get_preset("tiny").replace(vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    no_names = {names[id(p)] for p in no_decay["params"]}
    assert no_names and all(n.endswith(("norm.weight", ".bias")) for n in no_names)
    assert any(n.endswith("q_proj.bias") for n in no_names)
    # the tied embedding is one parameter with one optimizer state
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_is_the_token_mean_over_the_global_batch():
    from qwen15.train.loss import chunked_cross_entropy_sum, count_targets, cross_entropy_sum

    torch.manual_seed(0)
    logits = torch.randn(6, 9, 50, dtype=torch.float64)
    labels = torch.randint(0, 50, (6, 9))
    labels[torch.rand(6, 9) < 0.4] = -100
    labels[2] = -100  # a row without any target
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), labels.reshape(-1), ignore_index=-100
    )
    n = count_targets(labels)
    parts = [cross_entropy_sum(logits[i : i + 2], labels[i : i + 2]) / n for i in range(0, 6, 2)]
    assert float(sum(parts)) == pytest.approx(float(expected), rel=1e-6)
    hidden, weight = torch.randn(6, 9, 16), torch.randn(50, 16)
    whole = cross_entropy_sum(hidden @ weight.T, labels)
    assert float(chunked_cross_entropy_sum(hidden, weight, labels, 7)) == pytest.approx(
        float(whole), rel=1e-5
    )


def test_compiled_output_loss_equals_eager():
    """train.compile runs the output layer + cross-entropy as one compiled graph: the same loss and gradients as
    eager, in fp32 and under bf16 autocast (the GPU path), whole and chunked, with ignored labels."""
    from qwen15.data.dataset import IGNORE_INDEX
    from qwen15.train.loss import chunked_cross_entropy_sum, compiled_output_loss, output_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            eager = output_loss(hidden, weight, labels)
            compiled = compiled_output_loss(hidden, weight, labels)
            chunked = chunked_cross_entropy_sum(hidden, weight, labels, 7, compiled=True)
        tol = 1e-2 if autocast else 1e-5  # bf16 logits: compiled and eager may round the matmul differently
        for value in (compiled, chunked):
            assert float(value.detach()) == pytest.approx(float(eager.detach()), rel=tol)
            for got, want in zip(
                torch.autograd.grad(value, (hidden, weight)),
                torch.autograd.grad(eager, (hidden, weight), retain_graph=True),
            ):
                assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("chunk", [0, 5, 18])
def test_frozen_output_loss_equals_the_autograd_loss(chunk):
    """A frozen output layer (LoRA): the loss that computes the hidden states' gradient in its forward gives the
    autograd loss's value and gradient — fp32 to rounding, bf16 (plain and under autocast) bit for bit — chunked
    or not, with ignored labels; an upstream gradient scales it."""
    from qwen15.data.dataset import IGNORE_INDEX
    from qwen15.train.loss import frozen_output_loss, output_loss

    torch.manual_seed(0)
    labels = torch.randint(0, 300, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    targets = torch.tensor(40)  # of the global batch: more than this micro-batch holds
    for dtype, autocast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        hidden = torch.randn(2, 9, 16, dtype=dtype, requires_grad=True)
        weight = (torch.randn(300, 16) * 0.5).to(torch.bfloat16 if autocast else dtype)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            want = output_loss(hidden, weight, labels) / targets
            got = frozen_output_loss(hidden, weight, labels, targets, chunk)
        (want_grad,) = torch.autograd.grad(want, hidden)
        (got_grad,) = torch.autograd.grad(got, hidden, retain_graph=True)
        (tripled,) = torch.autograd.grad(got * 3, hidden)
        assert torch.equal(tripled, got_grad * 3)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        if dtype == torch.float32 and not autocast:
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got_grad, want_grad)
        assert not torch.equal(got_grad, torch.zeros_like(got_grad))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("layout", ["pad", "pack"])
def test_single_process_equals_the_reference_loop(tmp_path, layout):
    """Trainer (micro-batches of 2, accumulation 4, chunked loss for pack) vs the plain loop: the same losses and
    weights up to fp32 summation order (assert_matches_reference: its tolerances and the noise they come from)."""
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", layout)
    chunk = 7 if layout == "pack" else 0
    result = train(config(data, tmp_path / "run", train__loss_chunk_size=chunk), echo=lambda m: None)
    assert_run_matches_reference(result, reference_training(data))


def test_resume_continues_exactly(tmp_path):
    """10 steps straight == 5 steps, stop, resume for 5: bitwise equal losses and weights (CPU fp32 is
    deterministic, and the checkpoint restores weights, AdamW moments and step, schedule and data position)."""
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pack")
    straight = train(config(data, tmp_path / "a", train__steps=10), echo=lambda m: None)
    first = train(config(data, tmp_path / "b", train__steps=10, train__stop_at=5), echo=lambda m: None)
    assert first.step == 5 and first.last_checkpoint.name == "step-00000005"
    second = train(config(data, tmp_path / "b", train__steps=10), echo=lambda m: None)
    assert second.resumed_from == first.last_checkpoint
    assert first.losses + second.losses == straight.losses
    assert (
        max_abs_diff(checkpoint_weights(straight.last_checkpoint), checkpoint_weights(second.last_checkpoint))
        == 0
    )
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    # a second resume of a finished run does nothing
    again = train(config(data, tmp_path / "b", train__steps=10), echo=lambda m: None)
    assert again.losses == [] and again.step == 10


def _cli(
    args: list[str], env_extra: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "qwen15.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def _saving_state(ckpts: Path) -> str:
    """Where a stopped trainer is in writing its checkpoints, read from the folder."""
    partial = sorted(ckpts.glob(".step-*.partial"))
    if not partial:
        return "deleting an old checkpoint" if list(ckpts.glob(".step-*.old")) else "after the rename"
    p = partial[-1]
    if (p / "COMPLETE").is_file():
        return "marker written, before the rename"
    if (p / "state" / ".metadata").is_file():
        return "DCP written, before the marker"
    return "during the DCP write"


def _kill_while_saving(args: list[str], ckpts: Path, rng, after_marker: bool) -> str:
    """Start `qwen15 train` in its own process and SIGKILL it from outside at a random moment of its next
    checkpoint save: a random delay after the save's folder appears (0-120 ms; the DCP write takes 150-900 ms
    here), or after its COMPLETE marker appears (0-1 ms; the rename follows within a few ms). SIGSTOP first, so
    that the state the kill leaves can be read and reported."""
    import signal
    import time

    before = {p.name for p in ckpts.glob(".step-*.partial")} if ckpts.is_dir() else set()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen15.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        deadline, new = time.monotonic() + 300, []
        while not new and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.0002)
            new = [p for p in ckpts.glob(".step-*.partial") if p.name not in before] if ckpts.is_dir() else []
        if after_marker and new:
            marker = new[0] / "COMPLETE"
            while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
                pass  # the rename follows the marker within milliseconds: poll without sleeping
        time.sleep(rng.uniform(0, 0.001 if after_marker else 0.12))
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
        where = _saving_state(ckpts)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        return where
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _assert_only_complete_checkpoints_visible(ckpts: Path) -> None:
    from qwen15.train.dcp_checkpoint import complete_checkpoints, read_trainer_state

    visible = sorted(p for p in ckpts.iterdir() if re.fullmatch(r"step-\d{8}", p.name))
    assert visible == complete_checkpoints(ckpts)  # every step folder in sight is complete
    for checkpoint in visible:
        assert read_trainer_state(checkpoint)["step"] == int(checkpoint.name[5:])
        assert all(torch.isfinite(w).all() for w in checkpoint_weights(checkpoint).values())


@pytest.mark.slow
def test_killed_from_outside_while_saving_resumes_exactly(tmp_path):
    """SIGKILL sent from outside the process at random moments of its checkpoint saves (4 runs: twice during the
    DCP write, twice around the rename), a checkpoint every step, 2 kept. After each kill only complete
    checkpoints are in sight; each restart resumes from the latest one, and the run ends with the metrics and
    weights of an uninterrupted run, bitwise."""
    import random

    data = make_dataset(tmp_path / "data", "pad")
    run = tmp_path / "run"
    args = ["train", *overrides(data, run, train__steps=8, checkpoint__every=1, checkpoint__keep=2)]
    ckpts = run / "checkpoints"
    rng = random.Random(0)
    landed = []
    for after_marker in (False, True, False, True):
        landed.append(_kill_while_saving(args, ckpts, rng, after_marker))
        _assert_only_complete_checkpoints_visible(ckpts)
    print("kills landed:", landed)
    resumed = _cli(args, {"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert not list(ckpts.glob(".step-*"))  # the leftovers of the kills are gone
    _assert_only_complete_checkpoints_visible(ckpts)
    straight = _cli(
        ["train", *overrides(data, tmp_path / "straight", train__steps=8)], {"OMP_NUM_THREADS": "1"}
    )
    assert straight.returncode == 0, straight.stderr

    def losses(folder):
        return [
            (m["step"], m["loss"])
            for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        ]

    assert losses(run) == losses(tmp_path / "straight")
    a = checkpoint_weights(ckpts / "step-00000008")
    b = checkpoint_weights(tmp_path / "straight" / "checkpoints" / "step-00000008")
    assert max_abs_diff(a, b) == 0


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from qwen15.train import trainer as T

    data = make_dataset(tmp_path / "data", "pad")
    real = T.forward_backward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(T, "forward_backward", poisoned)
    cfg = config(data, tmp_path / "run", train__steps=6, checkpoint__every=1, checkpoint__keep=2)
    with pytest.raises(T.TrainingDiverged, match=r"the loss is nan at step 4.*step-00000003"):
        T.train(cfg, echo=lambda m: None)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000003"]
    weights = checkpoint_weights(tmp_path / "run" / "checkpoints" / "step-00000003")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_exploding_training_stops_before_corrupting_weights(tmp_path):
    """A learning rate of 1e4 without clipping blows the weights up; the run must stop on a non-finite loss or
    gradient norm, not save NaN weights."""
    from qwen15.train.trainer import TrainingDiverged, train

    data = make_dataset(tmp_path / "data", "pad")
    cfg = config(
        data,
        tmp_path / "run",
        train__steps=30,
        optim__lr=1e4,
        optim__min_lr=0,
        optim__warmup_steps=0,
        optim__clip_grad_norm=0,
        checkpoint__every=1,
    )
    with pytest.raises(TrainingDiverged, match=r"(loss|gradient norm) is (nan|inf)"):
        train(cfg, echo=lambda m: None)
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert all(torch.isfinite(w).all() for w in checkpoint_weights(last).values())


def test_run_directory_holds_config_metrics_and_loss_curve(tmp_path):
    pytest.importorskip("matplotlib")
    from qwen15.train.config import load_config
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pack")
    lines = []
    cfg = config(data, tmp_path / "run", metrics__plot=True, metrics__log_every=2, metrics__peak_tflops=0.5)
    train(cfg, echo=lines.append)
    run = tmp_path / "run"
    saved = load_config(run / "config.yaml")  # the resolved config is itself a valid recipe
    assert saved.train.global_batch_size == BASE["train.global_batch_size"] and saved.data.path == str(data)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s_per_device", "memory_gb", "eta_s", "mfu"):
        assert key in records[0]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s_per_device"] > 0 for r in records)
    from qwen15.train.metrics import flops_per_token

    for r in records:  # MFU = model FLOPs per token x tokens/s / the given peak (0.5 TFLOP/s)
        fpt = flops_per_token(saved_model_config(run), BASE_SEQ)
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s_per_device"] / 0.5e12, rel=1e-9)
    step_lines = [m for m in lines if m.startswith("step ")]
    assert len(step_lines) == 3 and "tok/s/dev" in step_lines[0] and "eta" in step_lines[0]  # steps 1, 2, 4
    assert "mfu" in step_lines[0] and "mem" in step_lines[0]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "train_config.yaml").is_file() and (ckpt / "config.json").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["sampler"]["position"] == 4 * BASE["train.global_batch_size"]


BASE_SEQ = 32  # make_dataset's sequence length


def saved_model_config(run):
    from qwen15.model_config import ModelConfig

    return ModelConfig.from_json_file(run / "checkpoints" / "step-00000004" / "config.json")


def test_mfu_flops_formula():
    from qwen15.model_config import get_preset
    from qwen15.train.metrics import flops_per_token, peak_tflops

    cfg = get_preset("qwen1.5-7b")
    # 6N for the 7.72B parameters minus the embedding lookup (the lm_head matmul stays), plus attention
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 100.0) == 100.0


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path):
    """The GPU path on CPU: FSDP2 mixed precision (bf16 compute, fp32 parameters and AdamW state). Losses stay
    within bf16 rounding of the fp32 reference (1e-3 here); checkpoints hold fp32 weights."""
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pack")
    lines = []
    result = train(config(data, tmp_path / "run", train__dtype="bfloat16"), echo=lines.append)
    assert any("bfloat16 compute" in m for m in lines)
    ref_losses = reference_training(data).losses
    assert result.losses == pytest.approx(ref_losses, abs=1e-3)
    assert result.losses != pytest.approx(ref_losses, abs=1e-7)  # it really ran in bf16
    weights = checkpoint_weights(result.last_checkpoint)
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_compiled_bf16_single_process_training(tmp_path):
    """The one-GPU path as it runs there (autocast bf16 over fp32 master weights, train.compile: compiled blocks
    and compiled output loss, here chunked as the long-sequence recipes run it), on CPU: losses within bf16
    rounding of the fp32 reference loop. (The unchunked compiled loss runs in the 2-process compile test.)"""
    from qwen15.train.trainer import train

    data = make_dataset(tmp_path / "data", "pack")
    result = train(
        config(
            data, tmp_path / "run", train__dtype="bfloat16", train__compile=True, train__loss_chunk_size=24
        ),
        echo=lambda m: None,
    )
    ref_losses = reference_training(data).losses
    assert result.losses == pytest.approx(ref_losses, abs=1e-3)
