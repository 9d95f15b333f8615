"""Nothing a user does loses their data: one test per defect of issue 12 (the overwrite rule, inputs never deleted,
training lineage, the run directory lock, damaged checkpoints, chat limits, stale partial folders, exports whose ids
are the model's). The bad-input table is test_bad_input.py; kills from outside are test_kill.py; two launchers as
two nodes are test_multinode.py; the documented commands are test_docs_commands.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import reliability_fixtures as fx
import torch

from qwen15.cli import main


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tokenizer, a dataset of its ids and a model folder of its vocabulary (built once for the module)."""
    root = tmp_path_factory.mktemp("rel")
    from qwen15 import Tokenizer

    art = fx.artifacts(root)
    fx.save_model(root / "model_long", Tokenizer.from_pretrained(art["tok"]), max_positions=256)
    return {**art, "model_long": root / "model_long"}


def train_args(art, run: Path, **changes) -> list[str]:
    return ["train", *fx.train_overrides(art["data"], run, art["tok"], art["vocab"], **changes)]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from train_helpers import checkpoint_weights

    return checkpoint_weights(checkpoint)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------- 1. overwrite


def test_from_tiktoken_needs_overwrite_and_refuses_empty_or_malformed_rank_files(tmp_path, capsys):
    ranks = fx.rank_file(tmp_path / "r.tiktoken")
    out = tmp_path / "tok"
    assert main(["tokenizer", "from-tiktoken", str(ranks), str(out)]) == 0
    before = fx.tree(out)
    fx.rank_file(ranks, n_merges=3)  # another vocabulary
    assert main(["tokenizer", "from-tiktoken", str(ranks), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and fx.tree(out) == before
    assert main(["tokenizer", "from-tiktoken", str(ranks), str(out), "--overwrite"]) == 0
    assert fx.tree(out) != before and len(json.loads((out / "vocab.json").read_text())) == 259
    for content in ("", "\n\n", "YQ== 0\n", "YQ== zero\n"):
        (tmp_path / "bad.tiktoken").write_text(content)
        assert main(["tokenizer", "from-tiktoken", str(tmp_path / "bad.tiktoken"), str(tmp_path / "t2")]) == 2
        assert "bad.tiktoken" in capsys.readouterr().err and not (tmp_path / "t2").exists()


# ---------------------------------------------------------------------------------------------- 2. inputs


def test_overwrite_never_deletes_an_input_or_a_folder_qwen15_did_not_write(art, tmp_path, capsys):
    run = tmp_path / "RUN"
    assert main(train_args(art, run)) == 0
    kept = fx.tree(run)
    # the command: the export would have replaced RUN, checkpoints and all
    assert (
        main(["convert", "--to", "hf", str(run / "checkpoints" / "step-00000002"), str(run), "--overwrite"])
        == 2
    )
    assert "holds this command's input" in capsys.readouterr().err and fx.tree(run) == kept
    data = tmp_path / "D"
    data.mkdir()
    (data / "raw.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]})
        + "\n"
    )
    (data / "unrelated.txt").write_text("mine\n")
    before = fx.tree(data)
    pre = [
        "data",
        "preprocess",
        "--type",
        "chat",
        "--tokenizer",
        str(art["tok"]),
        "--seq-length",
        "8",
        "--quiet",
    ]
    assert main([*pre, "--input", str(data / "raw.jsonl"), "--output", str(data), "--overwrite"]) == 2
    assert "holds this command's input" in capsys.readouterr().err and fx.tree(data) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work\n")
    assert (
        main([*pre, "--input", str(data / "raw.jsonl"), "--output", str(tmp_path / "mine"), "--overwrite"])
        == 2
    )
    assert "not written by qwen15" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work\n"
    # what qwen15 wrote is replaced with --overwrite, and only then
    out = tmp_path / "ds"
    assert main([*pre, "--input", str(data / "raw.jsonl"), "--output", str(out)]) == 0
    assert main([*pre, "--input", str(data / "raw.jsonl"), "--output", str(out)]) == 2
    assert main([*pre, "--input", str(data / "raw.jsonl"), "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------- 3. lineage


def test_resume_from_an_older_checkpoint_starts_a_new_lineage(art, tmp_path, capsys):
    """The issue's scenario: a run to step 6, resumed from step 2 with a new learning rate and stopped after
    re-saving step 4; `resume: auto` must then continue the new history (step 4), never the abandoned step 6."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    assert main(train_args(art, run, train__steps=6, checkpoint__every=2, checkpoint__keep=5)) == 0
    old6 = tmp_path / "old6"
    shutil.copytree(ckpts / "step-00000006", old6)
    capsys.readouterr()
    branch = dict(train__steps=6, checkpoint__every=2, checkpoint__keep=5, optim__lr=3e-3)
    resume2 = ["--checkpoint.resume", str(ckpts / "step-00000002")]
    assert main([*train_args(art, run, **branch, train__stop_at=4), *resume2]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "step-00000004, step-00000006" in out and "abandoned" in out
    assert "optim.lr 0.001 -> 0.003" in out  # the changed setting is named
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000002", "step-00000004"]
    (aside,) = (ckpts / "abandoned").iterdir()
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-00000004", "step-00000006"]
    assert (aside / "metrics.jsonl").is_file() and same_weights(aside / "step-00000006", old6)  # nothing lost
    state = json.loads((ckpts / "step-00000004" / "trainer_state.json").read_text())
    parent = json.loads((ckpts / "step-00000002" / "trainer_state.json").read_text())["lineage"]
    assert state["lineage"]["parent"]["id"] == parent["id"] and state["lineage"]["parent"]["step"] == 2
    assert state["lineage"]["id"] != parent["id"]
    # restarted as a job script would: resume auto continues the new lineage from its step 4
    assert main(train_args(art, run, **branch)) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step-00000004" in out and "steps 4 -> 6" in out
    assert (
        json.loads((ckpts / "step-00000006" / "trainer_state.json").read_text())["lineage"]
        == state["lineage"]
    )
    assert not same_weights(ckpts / "step-00000006", old6)
    # = the new history without the interruption
    straight = tmp_path / "straight"
    shutil.copytree(ckpts / "step-00000002", straight / "checkpoints" / "step-00000002")
    assert (
        main([*train_args(art, straight, **branch), "--checkpoint.resume", str(ckpts / "step-00000002")]) == 0
    )
    assert same_weights(ckpts / "step-00000006", straight / "checkpoints" / "step-00000006")
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in losses] == [1, 2, 3, 4, 5, 6]


def test_resume_never_in_a_used_run_directory_sets_the_old_checkpoints_aside(art, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(art, run)) == 0
    capsys.readouterr()
    assert main([*train_args(art, run, train__steps=1), "--checkpoint.resume", "never"]) == 0
    assert "starts over" in capsys.readouterr().out
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000001"]
    (aside,) = (run / "checkpoints" / "abandoned").iterdir()
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-00000001", "step-00000002"]


def test_a_finished_run_says_there_is_nothing_to_train(art, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(art, run)) == 0
    capsys.readouterr()
    assert main(train_args(art, run)) == 0
    assert "nothing to train: the run is at step 2 of train.steps 2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 4. the lock


def test_a_second_training_on_a_busy_run_directory_is_refused(art, tmp_path):
    """A training (another process, paused) holds RUN_DIR; a second one is refused naming its host and pid, and the
    first one's files are untouched; after it is gone the directory is free again."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "qwen15.cli", *train_args(art, run, train__steps=400, checkpoint__every=0)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        os.kill(first.pid, signal.SIGSTOP)
        before = fx.tree(run)
        second = subprocess.run(
            [sys.executable, "-m", "qwen15.cli", *train_args(art, run)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr, second.stderr
        assert "in use by another training" in second.stderr and fx.tree(run) == before
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert main([*train_args(art, run, train__steps=1), "--checkpoint.resume", "never"]) == 0


def test_the_lock_is_taken_in_process_too(art, tmp_path):
    from qwen15.train.config import load_config
    from qwen15.train.run_lock import RunDirBusy, RunLock
    from qwen15.train.trainer import train

    run = tmp_path / "run"
    held = RunLock(run).acquire()
    try:
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            train(load_config(None, train_args(art, run)[1:]), echo=lambda m: None)
    finally:
        held.release()
    assert not (run / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- 5. damaged


def _truncate_distcp(ckpt: Path) -> None:
    f = max((ckpt / "state").glob("*.distcp"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated .distcp": _truncate_distcp,
    "no trainer_state.json": lambda c: (c / "trainer_state.json").unlink(),
    "malformed trainer_state.json": lambda c: (c / "trainer_state.json").write_text('{"step": 4,'),
    "no .metadata": lambda c: (c / "state" / ".metadata").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(
    art, tmp_path, capsys, damage
):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert main(train_args(art, straight, train__steps=6, checkpoint__every=2)) == 0
    assert main(train_args(art, run, train__steps=6, checkpoint__every=2, train__stop_at=4)) == 0
    DAMAGE[damage](run / "checkpoints" / "step-00000004")
    capsys.readouterr()
    assert main(train_args(art, run, train__steps=6, checkpoint__every=2)) == 0
    out = capsys.readouterr().out
    assert "WARNING: checkpoint" in out and "step-00000004 is damaged" in out and "resuming from" in out
    assert "step-00000002" in out.split("resuming from", 1)[1].splitlines()[0]
    assert [p.name for p in (run / "checkpoints" / "damaged").iterdir()][0]  # moved aside, not deleted
    a, b = run / "checkpoints" / "step-00000006", straight / "checkpoints" / "step-00000006"
    assert same_weights(a, b)
    # named explicitly, a damaged checkpoint is refused (no silent substitute)
    bad = next((run / "checkpoints" / "damaged").iterdir()) / "step-00000004"
    assert main(["convert", "--to", "hf", str(bad), str(tmp_path / "hf")]) == 2
    assert "damaged checkpoint" in capsys.readouterr().err and not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------- 6. and 7. chat


def test_chat_with_the_default_max_new_tokens_answers_a_model_of_256_positions(art, capsys):
    """`qwen15 chat --model runs/demo/model` as the demo prints it: 512 new tokens by default, 256 positions."""
    assert main(["chat", "--model", str(art["model_long"]), "--predict-data", "hello there", "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("User: hello there\nAssistant: ") and len(captured.out) > 30
    assert "--max-new-tokens 512 is more than the context window (256 tokens)" in captured.err


def test_predict_data_goes_on_after_a_question_it_cannot_answer(art, capsys):
    long = "word " * 400
    code = main(["chat", "--model", str(art["model_long"]), "--max-new-tokens", "3", "--greedy",
                 "--predict-data", "first", long, "", "last"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    asked = [line[len("User: ") :] for line in captured.out.splitlines() if line.startswith("User: ")]
    assert asked == ["first", long, "last"]
    assert captured.out.count("Assistant: ") == 3
    assert "question 2:" in captured.err and "--context-window" in captured.err
    assert (
        "--predict-data question 3 is empty" in captured.err
        and "2 of 4 question(s) not answered" in captured.err
    )


def test_slash_commands_are_not_sent_to_the_model(art, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen15.cli",
            "chat",
            "--model",
            str(art["model_long"]),
            "--max-new-tokens",
            "2",
        ],
        input="/help\n/nonsense\n/usr/bin holds what?\n/exit\nnever asked\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "/clear" in proc.stderr and "unknown command /nonsense" in proc.stderr
    assert proc.stdout.count("Assistant: ") == 1  # only the question that starts with a path


# ---------------------------------------------------------------------------------------------- 9. partials


def test_stale_partial_folders_of_ours_are_removed_at_the_next_start(art, tmp_path):
    from qwen15.atomic import MARKER

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = tmp_path / ".ds.abc123.partial"
    ours.mkdir()
    (ours / MARKER).write_text(json.dumps({"partial": True, "host": socket.gethostname(), "pid": dead.pid}))
    (ours / "tokens.npy").write_bytes(b"\0" * 1000)
    alive = tmp_path / ".ds.live.partial"  # a writer that still runs (this process): left alone
    alive.mkdir()
    (alive / MARKER).write_text(
        json.dumps({"partial": True, "host": socket.gethostname(), "pid": os.getpid()})
    )
    foreign = tmp_path / ".ds.xyz.partial"  # not ours (no marker): left alone
    foreign.mkdir()
    (foreign / "notes").write_text("mine")
    (tmp_path / "in.txt").write_text("some text to tokenize into rows. " * 20)
    assert main(["data", "preprocess", "--type", "text", "--input", str(tmp_path / "in.txt"), "--tokenizer",
                 str(art["tok"]), "--seq-length", "8", "--output", str(tmp_path / "ds"), "--quiet"]) == 0  # fmt: skip
    assert not ours.exists() and alive.exists() and (foreign / "notes").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- 12. exports


def _load_without_warnings(folder: Path):
    """transformers loads the folder (model, generation config, tokenizer) and generates, with every warning an
    error: warnings.warn ones raised, transformers' logger warnings collected and asserted empty."""
    import logging

    transformers = pytest.importorskip("transformers")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = transformers.AutoModelForCausalLM.from_pretrained(folder)
            gen = transformers.GenerationConfig.from_pretrained(folder)
            tok = transformers.AutoTokenizer.from_pretrained(folder)
            ids = tok("hello world", return_tensors="pt")
            run = gen.to_dict()  # the file's settings (sampling or not), two new tokens
            run["max_new_tokens"] = 2
            torch.manual_seed(0)
            model.generate(**ids, generation_config=transformers.GenerationConfig(**run))
    finally:
        logger.removeHandler(handler)
    assert not records, records
    return model, gen, tok


def test_exports_carry_the_ids_of_the_tokenizer_saved_with_them(art, tmp_path):
    """Every writer path (convert of a chat finetune, convert of a pretraining, save_pretrained) gives a folder
    whose special-token ids are those of its own 300-token tokenizer, within the model's limits."""
    from qwen15 import Qwen, Tokenizer

    tok = Tokenizer.from_pretrained(art["tok"])
    run = tmp_path / "run"
    assert (
        main([*train_args(art, run, model__max_position_embeddings=32), "--generation.max_new_tokens", "512"])
        == 0
    )
    exports = {"chat": tmp_path / "chat", "base": tmp_path / "base", "saved": tmp_path / "saved"}
    assert main(["convert", "--to", "hf", str(run), str(exports["chat"]), "--chat"]) == 0
    assert main(["convert", "--to", "hf", str(run), str(exports["base"]), "--base"]) == 0
    Qwen.from_pretrained(exports["chat"]).save_pretrained(exports["saved"], tokenizer=tok)
    for name, folder in exports.items():
        config = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        ids = [
            config["bos_token_id"],
            *(
                [config["eos_token_id"]]
                if isinstance(config["eos_token_id"], int)
                else config["eos_token_id"]
            ),
        ]
        for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = generation.get(key)
            ids += value if isinstance(value, list) else [] if value is None else [value]
        assert all(i in tok.special_ids for i in ids), (name, ids)
        assert generation.get("max_new_tokens", 0) <= config["max_position_embeddings"], name
        model, gen, hf_tok = _load_without_warnings(folder)
        assert model.config.bos_token_id == tok.endoftext_id
    assert json.loads((exports["chat"] / "config.json").read_text())["eos_token_id"] == tok.im_end_id
    assert json.loads((exports["chat"] / "generation_config.json").read_text())["eos_token_id"] == [
        tok.im_end_id,
        tok.endoftext_id,
    ]


# ---------------------------------------------------------------------------------------------- the CLI's errors


def test_the_cli_reads_errors_one_way(monkeypatch, capsys, tmp_path):
    """UserError and OS errors about a path: one line, exit 2; anything else: the traceback and a request to report
    it, exit 1; --debug: the traceback always."""
    import errno

    from qwen15.commands import eval as eval_command
    from qwen15.errors import UserError

    def raising(error):
        def run(args):
            raise error

        return run

    argv = ["eval", "ppl", "--data", "x", "--model", "m"]
    cases = [
        (UserError("--data x: bad"), 2, "qwen15 eval: error: --data x: bad"),
        (
            PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "o")),
            2,
            f"{tmp_path / 'o'}: Permission",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), 2, "no space left on the device"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "somedir"), 2, "somedir: Is a directory"),
        (RuntimeError("boom"), 1, "This is a bug in qwen15"),
        (KeyError("k"), 1, "internal error (KeyError)"),
    ]
    for error, code, text in cases:
        monkeypatch.setattr(eval_command, "run", raising(error))
        assert main(argv) == code
        err = capsys.readouterr().err
        assert text in err and (("Traceback" in err) == (code == 1)), (error, err)
        assert main(["--debug", *argv]) == code and "Traceback" in capsys.readouterr().err
        assert main([*argv, "--debug"]) == code and "Traceback" in capsys.readouterr().err


def test_perplexity_of_a_model_far_off_the_text_is_infinite_not_a_crash():
    from qwen15 import Qwen
    from qwen15.perplexity import perplexity

    model = Qwen.from_config(fx.model_config(64), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    result = perplexity(model, list(range(1, 40)), seq_length=16, stride=8, progress=True)
    assert result.perplexity == float("inf") and result.tokens_scored == 38


def test_the_first_bytes_that_are_not_utf8_are_found_by_line_and_offset_across_blocks(tmp_path):
    from qwen15.data.inputs import first_invalid_utf8

    f = tmp_path / "t.txt"
    block = 1 << 20  # the reader's block size: a character cut by the block boundary is no error
    f.write_bytes(b"a" * (block - 1) + "é".encode() + b"\nok\n" + b"caf\xe9\n")
    assert first_invalid_utf8(f) == (3, block + 8, "invalid continuation byte")
    f.write_bytes(b"x\n" * 10 + b"\xff")
    assert first_invalid_utf8(f) == (11, 20, "invalid start byte")
    f.write_bytes(b"a" * (block - 1) + b"\xc3")  # cut short at the very end
    assert first_invalid_utf8(f) == (1, block - 1, "unexpected end of data")
    f.write_text("fine\n")
    assert first_invalid_utf8(f) is None
