"""`qwen15 data ...` as a user runs it: the console script, its messages and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen15.cli import main

from conftest import SHARED_DATA, SHARED_TOKENIZER, needs_shared

QWEN15 = [sys.executable, "-m", "qwen15.cli"]


@needs_shared
def test_seed_workflow_through_the_console(tmp_path):
    """alpaca-to-chat, then preprocess with the seed's option names (qa, vocab/merges files)."""
    conv = tmp_path / "alpaca-messages.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [*QWEN15, "data", "alpaca-to-chat", "--data_path", str(SHARED_DATA / "alpaca_data_first200.json"),
         "--output_path", str(conv)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote 200 conversations" in run.stdout
    out = tmp_path / "ds"
    run = subprocess.run(
        [*QWEN15, "data", "preprocess", "--dataset_type", "qa", "--input_glob", str(conv),
         "--vocab_file", str(SHARED_TOKENIZER / "vocab.json"), "--merges_file", str(SHARED_TOKENIZER / "merges.txt"),
         "--seq_length", "128", "--output", str(out), "--loss-on", "all", "--workers", "2"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "200 rows of 129 tokens" in run.stdout and "truncated to 129 tokens" in run.stdout
    assert "conv/s" in run.stderr  # the progress bar
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "qwen15-tokens" and meta["version"] == 1 and meta["type"] == "chat"
    assert meta["layout"] == "pad" and meta["loss_on"] == "all" and meta["rows"] == 200
    assert meta["vocab_size"] == 151646 and meta["pad_id"] == 151643
    assert np.load(out / "tokens.npy", mmap_mode="r").shape == (200, 129)


@needs_shared
def test_errors_are_one_line_messages(tmp_path, capsys):
    tok = str(SHARED_TOKENIZER)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]\n')
    code = main(["data", "preprocess", "--type", "chat", "--input", str(bad), "--tokenizer", tok,
                 "--seq-length", "16", "--output", str(tmp_path / "o"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:1: malformed JSON" in err and "--skip-bad" in err and "Traceback" not in err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code = main(["data", "preprocess", "--type", "wiki", "--input", str(bad), "--tokenizer", tok,
                 "--seq-length", "16", "--output", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    code = main(["data", "preprocess", "--type", "wiki", "--input", str(bad), "--seq-length", "16",
                 "--output", str(tmp_path / "p")])  # fmt: skip
    assert code == 2 and "--tokenizer DIR" in capsys.readouterr().err


@needs_shared
def test_wiki_command_and_inspect(tmp_path, capsys):
    out = tmp_path / "wiki"
    code = main(["data", "preprocess", "--type", "wiki", "--input", str(SHARED_DATA / "wikitext2_*.tokens.txt"),
                 "--tokenizer", str(SHARED_TOKENIZER), "--seq-length", "2048", "--output", str(out), "--quiet",
                 "--doc-separator", "eos"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert (
        code == 0 and "rows of 2,049 tokens (wiki" in stdout and "<|endoftext|> between documents" in stdout
    )
    meta = json.loads((out / "meta.json").read_text())
    assert [Path(s["path"]).name for s in meta["sources"]] == [
        "wikitext2_test.tokens.txt",
        "wikitext2_valid.tokens.txt",
    ]
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    code = main(
        ["data", "inspect", str(out), "--tokenizer", str(SHARED_TOKENIZER), "--rows", "1", "--chars", "80"]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and '"layout": "rows"' in stdout and "--- row 1: 2048 targets of 2048" in stdout


def test_help_lists_the_data_commands():
    run = subprocess.run([*QWEN15, "data", "--help"], capture_output=True, text=True)
    assert run.returncode == 0
    for name in ("alpaca-to-chat", "preprocess", "inspect"):
        assert name in run.stdout


@pytest.mark.parametrize("argv", [["data", "preprocess", "--help"], ["data", "alpaca-to-chat", "--help"]])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "--input" in capsys.readouterr().out
