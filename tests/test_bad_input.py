"""Bad input through the real command line: every command x {missing path, wrong kind of path, unwritable output,
malformed content, out-of-range value}. For each case: exit code 2, no traceback, an error line that names the
path, key or flag concerned (not just the usage text), and every file and folder that existed before unchanged,
nothing new written (hashed before and after each case).

The cases run in two subprocesses (tests/cli_batch.py), each calling qwen15.cli.main once per case, so that a
hundred and more command lines cost two Python start-ups, not one each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import reliability_fixtures as fx

HERE = Path(__file__).resolve().parent
# Messages that misled (issue 12): a file given as --model called a hub name, a missing tokenizer asking for weights.
FORBIDDEN = {"gen-model-is-file": "hub", "gen-tokenizer-missing": "safetensors", "enc-missing": "safetensors"}


def cases(p: dict) -> list[tuple[str, list[str], list[str]]]:
    """(id, argv, strings the message must contain)."""
    s = {k: str(v) for k, v in p.items()}
    new = p["new"]
    locked = p["locked"]
    model = ["--model", s["model"], "--device", "cpu"]
    gen = ["generate", "--prompt", "hello", *model, "--max-new-tokens", "2"]
    chat = ["chat", *model, "--max-new-tokens", "2", "--predict-data", "hi"]
    ppl = ["eval", "ppl", "--data", s["text"], *model, "--seq-length", "8", "--stride", "4", "--no-progress"]

    def pre_with(**changes):
        """`data preprocess` of the text file, with options replaced (None: left out)."""
        opts = {"--type": "text", "--input": s["text"], "--tokenizer": s["tok"], "--seq-length": "8"}
        opts.update({"--" + k.replace("_", "-"): v for k, v in changes.items()})
        out = ["data", "preprocess", "--quiet"]
        for k, v in opts.items():
            out += [] if v is None else [k, v]
        return out

    pre = pre_with()
    pre_chat = [
        "data",
        "preprocess",
        "--type",
        "chat",
        "--tokenizer",
        s["tok"],
        "--seq-length",
        "8",
        "--quiet",
    ]
    a2c = ["data", "alpaca-to-chat"]
    train = ["train", *fx.train_overrides(p["data"], new / "run", p["tok"], p["vocab"])]
    conv = ["convert", "--to", "hf"]
    gguf = ["convert", "--to", "gguf", "--quiet"]
    t2k = ["tokenizer", "from-tiktoken"]
    enc = ["tokenizer", "encode"]
    demo = ["demo", "--quick"]
    merge = ["lora", "merge", "--model", s["model"]]
    ms_from = ["convert", "--from", "mindspore"]
    c: list[tuple[str, list[str], list[str]]] = [
        # ------------------------------------------------------------------ tokenizer from-tiktoken
        ("t2k-missing", [*t2k, s["root"] + "/nope.tiktoken", str(new / "t")], ["nope.tiktoken"]),
        ("t2k-rank-is-dir", [*t2k, s["dir"], str(new / "t")], [s["dir"]]),
        ("t2k-empty", [*t2k, s["ranks_empty"], str(new / "t")], [s["ranks_empty"]]),
        ("t2k-bad-base64", [*t2k, s["ranks_bad"], str(new / "t")], [s["ranks_bad"] + ":1"]),
        ("t2k-gaps", [*t2k, s["ranks_gap"], str(new / "t")], [s["ranks_gap"]]),
        ("t2k-binary", [*t2k, s["ranks_binary"], str(new / "t")], [s["ranks_binary"]]),
        ("t2k-out-is-file", [*t2k, s["ranks"], s["notes"]], [s["notes"]]),
        ("t2k-out-exists", [*t2k, s["ranks"], s["tiktok"]], [s["tiktok"], "--overwrite"]),
        ("t2k-out-not-ours", [*t2k, s["ranks"], s["userdir"], "--overwrite"], [s["userdir"]]),
        ("t2k-out-holds-input", [*t2k, s["ranks"], s["root"], "--overwrite"], [s["root"]]),
        ("t2k-out-unwritable", [*t2k, s["ranks"], str(locked / "t")], [str(locked)]),
        ("t2k-out-under-file", [*t2k, s["ranks"], s["notes"] + "/t"], [s["notes"]]),
        # ------------------------------------------------------------------ tokenizer encode
        ("enc-missing", [*enc, "--tokenizer", str(new / "tok"), "hi"], [str(new / "tok")]),
        ("enc-is-file", [*enc, "--tokenizer", s["notes"], "hi"], [s["notes"]]),
        ("enc-no-files", [*enc, "--tokenizer", s["dir"], "hi"], [s["dir"]]),
        ("enc-model-bin-dir", [*enc, "--tokenizer", s["userdir"], "hi"], [s["userdir"]]),
        ("enc-bad-vocab", [*enc, "--tokenizer", s["tok_badvocab"], "hi"], ["vocab.json"]),
        ("enc-bad-bytes", [*enc, "--tokenizer", s["tok"], "caf\udce9"], ["TEXT", "UTF-8"]),
        (
            "enc-bad-config",
            [*enc, "--tokenizer", s["model_badcfg"] + "/../model_badcfg_tok", "hi"],
            ["model_badcfg_tok"],
        ),
        # ------------------------------------------------------------------ generate
        ("gen-model-missing", [*gen[:3], "--model", str(new / "m"), "--device", "cpu"], [str(new / "m")]),
        ("gen-model-is-file", [*gen[:3], "--model", s["notes"], "--device", "cpu"], [s["notes"], "file"]),
        (
            "gen-model-no-config",
            [*gen[:3], "--model", s["model_nocfg"], "--device", "cpu"],
            [s["model_nocfg"]],
        ),
        (
            "gen-model-bad-config",
            [*gen[:3], "--model", s["model_badcfg"], "--device", "cpu"],
            ["config.json:2"],
        ),
        (
            "gen-model-bin-only",
            [*gen[:3], "--model", s["model_bin"], "--device", "cpu"],
            ["pytorch_model.bin"],
        ),
        (
            "gen-model-truncated",
            [*gen[:3], "--model", s["model_trunc"], "--device", "cpu"],
            ["model.safetensors"],
        ),
        ("gen-model-nan", [*gen[:3], "--model", s["model_nan"], "--device", "cpu"], [s["model_nan"], "NaN"]),
        (
            "gen-model-wrong-type",
            [*gen[:3], "--model", s["model_wrongtype"], "--device", "cpu"],
            ["'hidden_size'"],
        ),
        (
            "gen-model-wrong-shape",
            [*gen[:3], "--model", s["model_shape"], "--device", "cpu"],
            ["wrong shapes"],
        ),
        (
            "gen-model-no-weights",
            [*gen[:3], "--model", s["model_noweights"], "--device", "cpu"],
            [s["model_noweights"]],
        ),
        ("gen-model-empty", [*gen[:3], "--model", "", "--device", "cpu"], ["empty path"]),
        ("gen-tokenizer-bad-vocab", [*gen, "--tokenizer", s["tok_badvocab"]], ["vocab.json"]),
        ("gen-model-dir-of-files", [*gen[:3], "--model", s["dir"], "--device", "cpu"], [s["dir"]]),
        ("gen-tokenizer-missing", [*gen, "--tokenizer", str(new / "tok")], [str(new / "tok")]),
        ("gen-tokenizer-too-big", [*gen, "--tokenizer", s["bigtok"]], ["--tokenizer", s["bigtok"]]),
        ("gen-device-bad", [*gen, "--device", "gpu0"], ["--device", "gpu0"]),
        ("gen-device-cuda-index", [*gen, "--device", "cuda:x"], ["--device", "cuda:x"]),
        ("gen-device-cuda", [*gen, "--device", "cuda"], ["--device"]),
        ("gen-max-new-0", [*gen, "--max-new-tokens", "0"], ["--max-new-tokens"]),
        ("gen-max-new-neg", [*gen, "--max-new-tokens", "-3"], ["--max-new-tokens"]),
        ("gen-temp-neg-greedy", [*gen, "--temperature", "-2", "--greedy"], ["--temperature"]),
        ("gen-temp-neg", [*gen, "--temperature", "-1"], ["--temperature"]),
        ("gen-temp-nan", [*gen, "--temperature", "nan"], ["--temperature"]),
        ("gen-top-p-big", [*gen, "--top-p", "1.5"], ["--top-p"]),
        ("gen-top-p-zero", [*gen, "--top-p", "0"], ["--top-p"]),
        ("gen-top-k-neg", [*gen, "--top-k", "-1"], ["--top-k"]),
        ("gen-rep-zero", [*gen, "--repetition-penalty", "0"], ["--repetition-penalty"]),
        ("gen-stop-id-big", [*gen, "--stop-token-id", "99999"], ["--stop-token-id", "99999"]),
        ("gen-stop-id-neg", [*gen, "--stop-token-id", "-1"], ["--stop-token-id"]),
        ("gen-seed-neg", [*gen, "--seed", "-1"], ["--seed"]),
        ("gen-compile-cpu", [*gen, "--compile"], ["--compile"]),
        ("gen-stream-two", [*gen, "--prompt", "b", "--stream"], ["--stream"]),
        ("gen-empty-prompt", ["generate", "--prompt", "", *model], ["prompt"]),
        # ------------------------------------------------------------------ chat
        ("chat-model-missing", ["chat", "--model", str(new / "m"), "--predict-data", "hi"], [str(new / "m")]),
        ("chat-model-is-file", ["chat", "--model", s["notes"], "--predict-data", "hi"], [s["notes"]]),
        (
            "chat-model-bin-only",
            ["chat", "--model", s["model_bin"], "--predict-data", "hi"],
            ["pytorch_model.bin"],
        ),
        ("chat-window-0", [*chat, "--context-window", "0"], ["--context-window"]),
        ("chat-window-neg", [*chat, "--context-window", "-5"], ["--context-window"]),
        ("chat-window-big", [*chat, "--context-window", "100000"], ["--context-window", "64"]),
        ("chat-max-new-0", [*chat, "--max-new-tokens", "0"], ["--max-new-tokens"]),
        ("chat-empty-question", [*chat[:-1], ""], ["--predict-data", "empty"]),
        ("chat-stop-id-big", [*chat, "--stop-token-id", "4000"], ["--stop-token-id"]),
        ("chat-temp-neg-greedy", [*chat, "--temperature", "-2", "--greedy"], ["--temperature"]),
        ("chat-top-p", [*chat, "--top-p", "2"], ["--top-p"]),
        ("chat-device", [*chat, "--device", "tpu"], ["--device", "tpu"]),
        ("chat-tokenizer-file", [*chat, "--tokenizer", s["notes"]], [s["notes"]]),
        ("chat-question-too-long", [*chat[:-1], p["question"].read_text()], ["--context-window"]),
        # ------------------------------------------------------------------ eval ppl
        ("ppl-data-missing", [*ppl[:2], "--data", str(new / "x.txt"), *ppl[4:]], [str(new / "x.txt")]),
        ("ppl-data-dir", [*ppl[:2], "--data", s["dir"], *ppl[4:]], [s["dir"]]),
        ("ppl-data-latin1", [*ppl[:2], "--data", s["latin1"], *ppl[4:]], [s["latin1"] + ":3"]),
        ("ppl-data-empty", [*ppl[:2], "--data", s["empty"], *ppl[4:]], [s["empty"]]),
        ("ppl-data-device", [*ppl[:2], "--data", "/dev/null", *ppl[4:]], ["/dev/null", "regular file"]),
        ("ppl-max-tokens-neg", [*ppl, "--max-tokens", "-5"], ["--max-tokens"]),
        ("ppl-max-tokens-0", [*ppl, "--max-tokens", "0"], ["--max-tokens"]),
        ("ppl-seq-0", [*ppl, "--seq-length", "0"], ["--seq-length"]),
        ("ppl-seq-too-long", [*ppl, "--seq-length", "1000"], ["--seq-length", "64"]),
        ("ppl-stride-0", [*ppl, "--stride", "0"], ["--stride"]),
        ("ppl-stride-big", [*ppl, "--stride", "9"], ["--stride"]),
        ("ppl-model-missing", [*ppl[:4], "--model", str(new / "m")], [str(new / "m")]),
        ("ppl-model-bin", [*ppl[:4], "--model", s["model_bin"]], ["pytorch_model.bin"]),
        ("ppl-tokenizer-big", [*ppl, "--tokenizer", s["bigtok"]], ["--tokenizer"]),
        ("ppl-model-nan", [*ppl[:4], "--model", s["model_nan"], "--no-progress"], ["NaN"]),
        # ------------------------------------------------------------------ data alpaca-to-chat
        (
            "a2c-missing",
            [*a2c, "--input", str(new / "a.json"), "--output", str(new / "o.jsonl")],
            [str(new / "a.json")],
        ),
        ("a2c-input-dir", [*a2c, "--input", s["dir"], "--output", str(new / "o.jsonl")], [s["dir"]]),
        (
            "a2c-malformed",
            [*a2c, "--input", s["alpaca_bad"], "--output", str(new / "o.jsonl")],
            [s["alpaca_bad"] + ":3"],
        ),
        ("a2c-latin1", [*a2c, "--input", s["latin1"], "--output", str(new / "o.jsonl")], [s["latin1"]]),
        ("a2c-empty", [*a2c, "--input", s["empty"], "--output", str(new / "o.jsonl")], [s["empty"]]),
        ("a2c-out-exists", [*a2c, "--input", s["alpaca"], "--output", s["existing_jsonl"]], ["--overwrite"]),
        ("a2c-out-is-dir", [*a2c, "--input", s["alpaca"], "--output", s["dir"]], [s["dir"]]),
        (
            "a2c-out-unwritable",
            [*a2c, "--input", s["alpaca"], "--output", str(locked / "o.jsonl")],
            [str(locked)],
        ),
        (
            "a2c-out-under-file",
            [*a2c, "--input", s["alpaca"], "--output", s["notes"] + "/o.jsonl"],
            [s["notes"]],
        ),
        (
            "a2c-out-is-input",
            [*a2c, "--input", s["alpaca"], "--output", s["alpaca"], "--overwrite"],
            [s["alpaca"]],
        ),
        (
            "a2c-out-not-ours",
            [*a2c, "--input", s["alpaca"], "--output", s["notes"], "--overwrite"],
            [s["notes"]],
        ),
        (
            "a2c-out-device",
            [*a2c, "--input", s["alpaca"], "--output", "/dev/null", "--overwrite"],
            ["/dev/null"],
        ),
        (
            "a2c-chat-input",
            [*a2c, "--input", s["chat"], "--output", str(new / "o.jsonl")],
            [s["chat"] + ":1"],
        ),
        # ------------------------------------------------------------------ data preprocess
        (
            "pre-input-missing",
            [*pre_with(input=str(new / "x.txt")), "--output", str(new / "ds")],
            [str(new / "x.txt")],
        ),
        ("pre-input-dir", [*pre_with(input=s["dir"]), "--output", str(new / "ds")], [s["dir"]]),
        (
            "pre-input-glob",
            [*pre_with(input=s["root"] + "/*.nothing"), "--output", str(new / "ds")],
            ["*.nothing"],
        ),
        (
            "pre-input-latin1",
            [*pre_with(input=s["latin1"]), "--output", str(new / "ds")],
            [s["latin1"] + ":3"],
        ),
        ("pre-input-empty", [*pre_with(input=s["empty"]), "--output", str(new / "ds")], [s["empty"]]),
        (
            "pre-chat-latin1",
            [*pre_chat, "--input", s["latin1_chat"], "--output", str(new / "ds")],
            [s["latin1_chat"] + ":2"],
        ),
        (
            "pre-chat-malformed",
            [*pre_chat, "--input", s["chat_bad"], "--output", str(new / "ds")],
            [s["chat_bad"] + ":1"],
        ),
        (
            "pre-tok-missing",
            [*pre_with(tokenizer=str(new / "tok")), "--output", str(new / "ds")],
            [str(new / "tok")],
        ),
        ("pre-tok-file", [*pre_with(tokenizer=s["notes"]), "--output", str(new / "ds")], [s["notes"]]),
        ("pre-tok-none", [*pre_with(tokenizer=None), "--output", str(new / "ds")], ["--tokenizer"]),
        (
            "pre-vocab-missing",
            [
                *pre_with(tokenizer=None, vocab_file=str(new / "v.json"), merges_file=str(new / "m.txt")),
                "--output",
                str(new / "ds"),
            ],
            [str(new / "v.json")],
        ),  # fmt: skip
        ("pre-out-file", [*pre, "--output", s["notes"]], [s["notes"]]),
        ("pre-out-exists", [*pre, "--output", s["existing_ds"]], [s["existing_ds"], "--overwrite"]),
        ("pre-out-not-ours", [*pre, "--output", s["userdir"], "--overwrite"], [s["userdir"]]),
        (
            "pre-out-holds-input",
            [
                "data",
                "preprocess",
                "--type",
                "chat",
                "--input",
                str(p["D"] / "raw.jsonl"),
                "--tokenizer",
                s["tok"],
                "--seq-length",
                "8",
                "--output",
                s["D"],
                "--overwrite",
                "--quiet",
            ],
            [s["D"]],
        ),  # fmt: skip
        ("pre-out-holds-tok", [*pre, "--output", s["tok"], "--overwrite"], [s["tok"]]),
        ("pre-out-is-parent", [*pre, "--output", s["root"], "--overwrite"], [s["root"]]),
        ("pre-out-unwritable", [*pre, "--output", str(locked / "ds")], [str(locked)]),
        ("pre-out-under-file", [*pre, "--output", s["notes"] + "/ds"], [s["notes"]]),
        ("pre-seq-0", [*pre_with(seq_length="0"), "--output", str(new / "ds")], ["--seq-length"]),
        ("pre-seq-neg", [*pre_with(seq_length="-4"), "--output", str(new / "ds")], ["--seq-length"]),
        (
            "pre-seq-huge-pad",
            [*pre_chat[:7], "100000000000", "--input", s["chat"], "--output", str(new / "ds")],
            ["--seq-length"],
        ),
        (
            "pre-seq-huge-pack",
            [
                *pre_chat[:7],
                "100000000000",
                "--layout",
                "pack",
                "--input",
                s["chat"],
                "--output",
                str(new / "ds"),
            ],
            ["--seq-length"],
        ),  # fmt: skip
        ("pre-workers-0", [*pre, "--output", str(new / "ds"), "--workers", "0"], ["--workers"]),
        # ------------------------------------------------------------------ data inspect
        ("ins-missing", ["data", "inspect", str(new / "ds")], [str(new / "ds")]),
        ("ins-file", ["data", "inspect", s["notes"]], [s["notes"]]),
        ("ins-not-dataset", ["data", "inspect", s["userdir"]], [s["userdir"]]),
        ("ins-rows-big", ["data", "inspect", s["data"], "--rows", "999"], ["--rows", "999"]),
        ("ins-rows-neg", ["data", "inspect", s["data"], "--rows", "-1"], ["--rows"]),
        (
            "ins-tok-missing",
            ["data", "inspect", s["data"], "--tokenizer", str(new / "tok")],
            [str(new / "tok")],
        ),
        ("ins-chars-neg", ["data", "inspect", s["data"], "--chars", "-1"], ["--chars"]),
        ("ins-truncated", ["data", "inspect", s["data_trunc"]], [s["data_trunc"] + "/tokens.npy"]),
        ("ins-bad-meta", ["data", "inspect", s["data_badmeta"]], ["meta.json", "seq_length"]),
        ("ins-model-dir", ["data", "inspect", s["model"]], [s["model"]]),
        # ------------------------------------------------------------------ train
        ("train-config-missing", ["train", "--config", str(new / "r.yaml")], [str(new / "r.yaml")]),
        ("train-config-dir", ["train", "--config", s["dir"]], [s["dir"]]),
        ("train-config-latin1", ["train", "--config", s["recipe_latin1"]], [s["recipe_latin1"]]),
        (
            "train-config-malformed",
            ["train", "--config", s["recipe_malformed"]],
            [s["recipe_malformed"] + ":"],
        ),
        (
            "train-config-bad-value",
            ["train", "--config", s["recipe_bad_value"]],
            [s["recipe_bad_value"] + ":7"],
        ),
        ("train-data-missing", [*train, "--data.path", str(new / "ds")], [str(new / "ds")]),
        ("train-data-truncated", [*train, "--data.path", s["data_trunc"]], [s["data_trunc"] + "/tokens.npy"]),
        ("train-data-bad-meta", [*train, "--data.path", s["data_badmeta"]], ["seq_length"]),
        (
            "train-model-config-type",
            [*train, "--model.preset", "null", "--model.config", s["model_wrongtype"] + "/config.json"],
            ["'hidden_size'"],
        ),  # fmt: skip
        ("train-data-file", [*train, "--data.path", s["notes"]], [s["notes"]]),
        ("train-data-not-dataset", [*train, "--data.path", s["userdir"]], [s["userdir"]]),
        ("train-run-dir-file", [*train, "--train.run_dir", s["notes"]], [s["notes"]]),
        ("train-run-dir-unwritable", [*train, "--train.run_dir", str(locked / "run")], [str(locked)]),
        ("train-run-dir-under-file", [*train, "--train.run_dir", s["notes"] + "/run"], [s["notes"]]),
        ("train-ckpt-dir-file", [*train, "--checkpoint.dir", s["notes"]], [s["notes"]]),
        (
            "train-model-path-missing",
            ["train", *fx.finetune_overrides(p["data"], new / "run", new / "m")],
            [str(new / "m")],
        ),
        (
            "train-model-path-bin",
            ["train", *fx.finetune_overrides(p["data"], new / "run", p["model_bin"])],
            ["pytorch_model.bin"],
        ),
        (
            "train-model-path-nan",
            ["train", *fx.finetune_overrides(p["data"], new / "run", p["model_nan"])],
            ["NaN"],
        ),
        ("train-tokenizer-missing", [*train, "--model.tokenizer", str(new / "tok")], [str(new / "tok")]),
        ("train-resume-missing", [*train, "--checkpoint.resume", str(new / "ck")], [str(new / "ck")]),
        ("train-resume-truncated", [*train, "--checkpoint.resume", s["ckpt_trunc"]], [s["ckpt_trunc"]]),
        (
            "train-resume-bad-state",
            [*train, "--checkpoint.resume", s["ckpt_badstate"]],
            ["trainer_state.json"],
        ),
        ("train-resume-no-metadata", [*train, "--checkpoint.resume", s["ckpt_nometa"]], [".metadata"]),
        (
            "train-resume-incomplete",
            [*train, "--checkpoint.resume", s["ckpt_incomplete"]],
            [s["ckpt_incomplete"]],
        ),
        ("train-device-cuda", [*train, "--train.device", "cuda"], ["train.device"]),
        ("train-steps-0", [*train, "--train.steps", "0"], ["train.steps"]),
        ("train-lr-neg", [*train, "--optim.lr", "-1"], ["optim.lr"]),
        ("train-batch", [*train, "--train.global_batch_size", "3"], ["train.global_batch_size"]),
        ("train-positions", [*train, "--model.max_position_embeddings", "8"], ["max_position_embeddings"]),
        ("train-vocab-small", [*train, "--model.vocab_size", "100"], ["vocab_size"]),
        # ------------------------------------------------------------------ convert
        ("conv-missing", [*conv, str(new / "ck"), str(new / "out")], [str(new / "ck")]),
        ("conv-is-file", [*conv, s["notes"], str(new / "out")], [s["notes"]]),
        ("conv-incomplete", [*conv, s["ckpt_incomplete"], str(new / "out")], [s["ckpt_incomplete"]]),
        ("conv-truncated", [*conv, s["ckpt_trunc"], str(new / "out")], [s["ckpt_trunc"]]),
        ("conv-bad-state", [*conv, s["ckpt_badstate"], str(new / "out")], ["trainer_state.json"]),
        ("conv-no-metadata", [*conv, s["ckpt_nometa"], str(new / "out")], [".metadata"]),
        ("conv-bad-config", [*conv, s["ckpt_badconfig"], str(new / "out")], ["config.json"]),
        ("conv-out-exists", [*conv, s["ckpt"], s["export"]], [s["export"], "--overwrite"]),
        ("conv-out-file", [*conv, s["ckpt"], s["notes"]], [s["notes"]]),
        ("conv-out-unwritable", [*conv, s["ckpt"], str(locked / "out")], [str(locked)]),
        ("conv-out-under-file", [*conv, s["ckpt"], s["notes"] + "/out"], [s["notes"]]),
        ("conv-out-holds-input", [*conv, s["ckpt"], s["run"], "--overwrite"], [s["run"]]),
        ("conv-out-is-input", [*conv, s["ckpt"], s["ckpt"], "--overwrite"], [s["ckpt"]]),
        ("conv-out-not-ours", [*conv, s["ckpt"], s["userdir"], "--overwrite"], [s["userdir"]]),
        (
            "conv-shard-size-text",
            [*conv, s["ckpt"], str(new / "out"), "--max-shard-size", "big"],
            ["--max-shard-size"],
        ),
        (
            "conv-shard-size-0",
            [*conv, s["ckpt"], str(new / "out"), "--max-shard-size", "0"],
            ["--max-shard-size"],
        ),
        (
            "conv-shard-size-huge",
            [*conv, s["ckpt"], str(new / "out"), "--max-shard-size", "9" * 400 + "GB"],
            ["--max-shard-size"],
        ),  # fmt: skip
        ("conv-model-dir", [*conv, s["model"], str(new / "out")], [s["model"]]),
        # ------------------------------------------------------------------ convert --to gguf
        (
            "gguf-type-unknown",
            [*gguf, s["model"], str(new / "m.gguf"), "--gguf-type", "q5_k"],
            ["--gguf-type"],
        ),
        ("gguf-type-not-gguf", [*conv, s["ckpt"], str(new / "o"), "--gguf-type", "f16"], ["--gguf-type"]),
        ("gguf-not-model", [*gguf, s["dir"], str(new / "m.gguf")], [s["dir"], "config.json"]),
        ("gguf-src-missing", [*gguf, str(new / "src"), str(new / "m.gguf")], [str(new / "src")]),
        ("gguf-no-weights", [*gguf, s["model_noweights"], str(new / "m.gguf")], [s["model_noweights"]]),
        ("gguf-truncated", [*gguf, s["model_trunc"], str(new / "m.gguf")], [s["model_trunc"]]),
        ("gguf-bad-config", [*gguf, s["model_badcfg"], str(new / "m.gguf")], ["config.json"]),
        ("gguf-shape", [*gguf, s["model_shape"], str(new / "m.gguf")], [s["model_shape"]]),
        ("gguf-out-exists", [*gguf, s["model"], s["notes"]], [s["notes"], "--overwrite"]),
        ("gguf-out-not-gguf", [*gguf, s["model"], s["notes"], "--overwrite"], [s["notes"]]),
        ("gguf-out-is-dir", [*gguf, s["model"], s["userdir"], "--overwrite"], [s["userdir"]]),
        ("gguf-out-is-input", [*gguf, s["model"], s["model"], "--overwrite"], [s["model"]]),
        ("gguf-out-unwritable", [*gguf, s["model"], str(locked / "m.gguf")], [str(locked)]),
        ("gguf-ckpt-damaged", [*gguf, s["ckpt_trunc"], str(new / "m.gguf")], [s["ckpt_trunc"]]),
        ("gguf-chat-hf", [*gguf, s["model"], str(new / "m.gguf"), "--chat"], ["--chat"]),
        ("gguf-dtype", [*gguf, s["model"], str(new / "m.gguf"), "--dtype", "float16"], ["--dtype"]),
        ("gguf-from-ms", [*ms_from, "--to", "gguf", s["notes"], str(new / "m.gguf")], ["--to gguf"]),
        # ------------------------------------------------------------------ LoRA adapters, speculative decoding
        ("gen-adapter-missing", [*gen, "--adapter", str(new / "ad")], ["--adapter", str(new / "ad")]),
        ("gen-adapter-is-file", [*gen, "--adapter", s["notes"]], [s["notes"]]),
        ("gen-adapter-no-config", [*gen, "--adapter", s["dir"]], [s["dir"], "adapter_config.json"]),
        ("gen-adapter-bad-config", [*gen, "--adapter", s["adapter_badcfg"]], ["adapter_config.json"]),
        ("gen-adapter-dora", [*gen, "--adapter", s["adapter_dora"]], ["use_dora"]),
        ("chat-adapter-missing", [*chat, "--adapter", str(new / "ad")], [str(new / "ad")]),
        ("gen-draft-missing", [*gen, "--draft-model", str(new / "d")], [str(new / "d")]),
        ("gen-draft-is-file", [*gen, "--draft-model", s["notes"]], [s["notes"]]),
        ("gen-draft-other-vocab", [*gen, "--draft-model", s["model_othervocab"]], ["--draft-model"]),
        (
            "gen-draft-tokens-0",
            [*gen, "--draft-model", s["model"], "--draft-tokens", "0"],
            ["--draft-tokens"],
        ),
        ("gen-draft-two-prompts", [*gen, "--prompt", "b", "--draft-model", s["model"]], ["--draft-model"]),
        ("chat-draft-missing", [*chat, "--draft-model", str(new / "d")], [str(new / "d")]),
        (
            "merge-adapter-missing",
            [*merge, "--adapter", str(new / "ad"), "--output", str(new / "m")],
            [str(new / "ad")],
        ),
        (
            "merge-model-missing",
            [*merge[:2], "--model", str(new / "b"), "--adapter", s["adapter"], "--output", str(new / "m")],
            [str(new / "b")],
        ),
        (
            "merge-out-is-model",
            [*merge, "--adapter", s["adapter"], "--output", s["model"], "--overwrite"],
            [s["model"]],
        ),
        (
            "merge-out-is-adapter",
            [*merge, "--adapter", s["adapter"], "--output", s["adapter"], "--overwrite"],
            [s["adapter"]],
        ),
        (
            "merge-out-exists",
            [*merge, "--adapter", s["adapter"], "--output", s["export"]],
            [s["export"], "--overwrite"],
        ),
        (
            "merge-out-not-ours",
            [*merge, "--adapter", s["adapter"], "--output", s["userdir"], "--overwrite"],
            [s["userdir"]],
        ),
        (
            "merge-out-unwritable",
            [*merge, "--adapter", s["adapter"], "--output", str(locked / "m")],
            [str(locked)],
        ),
        ("merge-out-file", [*merge, "--adapter", s["adapter"], "--output", s["notes"]], [s["notes"]]),
        (
            "peft-full-checkpoint",
            ["convert", "--to", "peft", s["ckpt"], str(new / "ad")],
            [s["ckpt"], "--to hf"],
        ),
        ("peft-missing", ["convert", "--to", "peft", str(new / "ck"), str(new / "ad")], [str(new / "ck")]),
        # ------------------------------------------------------------------ MindSpore
        (
            "ms-ckpt-missing",
            [*ms_from, str(new / "x.ckpt"), str(new / "hf"), "--config", s["model"] + "/config.json"],
            [str(new / "x.ckpt")],
        ),
        (
            "ms-ckpt-not-ckpt",
            [*ms_from, s["notes"], str(new / "hf"), "--config", s["model"] + "/config.json"],
            [s["notes"]],
        ),
        ("ms-no-config", [*ms_from, s["notes"], str(new / "hf")], ["--config"]),
        (
            "ms-config-missing",
            [*ms_from, s["notes"], str(new / "hf"), "--config", str(new / "c.yaml")],
            [str(new / "c.yaml")],
        ),
        (
            "ms-to-missing",
            ["convert", "--to", "mindspore", str(new / "hf"), str(new / "o.ckpt")],
            [str(new / "hf")],
        ),
        ("ms-to-out-exists", ["convert", "--to", "mindspore", s["model"], s["notes"]], [s["notes"]]),
        (
            "ms-to-out-is-dir",
            ["convert", "--to", "mindspore", s["model"], s["userdir"], "--overwrite"],
            [s["userdir"]],
        ),
        ("ms-option-wrong-way", ["convert", "--to", "hf", s["ckpt"], str(new / "o"), "--crc"], ["--crc"]),
        (
            "mr-missing",
            [
                "data",
                "from-mindrecord",
                str(new / "x.mindrecord"),
                str(new / "d"),
                "--tokenizer",
                s["tok"],
                "--quiet",
            ],
            [str(new / "x.mindrecord")],
        ),
        (
            "mr-not-mindrecord",
            ["data", "from-mindrecord", s["notes"], str(new / "d"), "--tokenizer", s["tok"], "--quiet"],
            [s["notes"]],
        ),
        # ------------------------------------------------------------------ serve (refused before it listens)
        ("serve-model-missing", ["serve", "--model", str(new / "m"), "--device", "cpu"], [str(new / "m")]),
        ("serve-port", ["serve", *model, "--port", "70000"], ["--port"]),
        ("serve-max-seqs-0", ["serve", *model, "--max-num-seqs", "0"], ["--max-num-seqs"]),
        ("serve-kv-memory", ["serve", *model, "--kv-cache-memory", "lots"], ["--kv-cache-memory"]),
        ("serve-adapter-missing", ["serve", *model, "--adapter", str(new / "ad")], [str(new / "ad")]),
        (
            "serve-step-log-no-folder",
            ["serve", *model, "--step-log", str(new / "logs" / "steps.jsonl")],
            ["--step-log", str(new / "logs")],
        ),
        # ------------------------------------------------------------------ demo
        ("demo-out-file", [*demo, "--out", s["notes"]], [s["notes"]]),
        ("demo-out-not-ours", [*demo, "--out", s["userdir"]], [s["userdir"]]),
        ("demo-out-unwritable", [*demo, "--out", str(locked / "demo")], [str(locked)]),
        ("demo-out-under-file", [*demo, "--out", s["notes"] + "/demo"], [s["notes"]]),
        (
            "demo-steps-neg",
            [*demo, "--out", str(new / "demo"), "--pretrain-steps", "-1"],
            ["--pretrain-steps"],
        ),
        (
            "demo-ft-steps-0",
            [*demo, "--out", str(new / "demo"), "--finetune-steps", "0"],
            ["--finetune-steps"],
        ),
        ("demo-threads-0", [*demo, "--out", str(new / "demo"), "--threads", "-2"], ["--threads"]),
    ]
    return c


def _adapters_and_drafts(p: dict, root: Path) -> None:
    """A PEFT adapter of the fixture model, broken ones, and a model of another vocabulary (a draft that cannot
    draft for it)."""
    import torch

    from qwen15 import Qwen
    from qwen15.lora import LoRASpec, add_adapters, save_adapter

    model = Qwen.from_pretrained(str(p["model"]))
    add_adapters(model, LoRASpec(r=2, alpha=4), generator=torch.Generator().manual_seed(0))
    p["adapter"] = root / "adapter"
    save_adapter(model, p["adapter"])
    config = json.loads((p["adapter"] / "adapter_config.json").read_text())
    for name, text in (
        ("adapter_badcfg", '{"r": 2,\n'),
        ("adapter_dora", json.dumps({**config, "use_dora": True})),
    ):
        p[name] = root / name
        shutil.copytree(p["adapter"], p[name])
        (p[name] / "adapter_config.json").write_text(text)
    p["model_othervocab"] = root / "model_othervocab"  # another tokenizer (a larger vocabulary)
    big = fx.tokenizer(400)
    config = model.config.replace(vocab_size=len(big) + 16)
    Qwen.from_config(config, seed=0).save_pretrained(str(p["model_othervocab"]), tokenizer=big)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "w0"
    p = fx.build(root)
    _adapters_and_drafts(p, root)
    (root / "model_badcfg_tok").mkdir()
    (root / "model_badcfg_tok" / "tokenizer_config.json").write_text('{"added_tokens_decoder": [1, \n')
    for f in ("vocab.json", "merges.txt"):
        (root / "model_badcfg_tok" / f).write_bytes((p["tok"] / f).read_bytes())
    copies = [p]
    try:
        fx.make_writable(p["locked"])
        for i in (1,):  # one copy per batch: each batch watches a tree no other process touches
            other = root.with_name(f"w{i}")
            shutil.copytree(root, other, symlinks=True)
            copies.append(
                {k: other / v.relative_to(root) if isinstance(v, Path) else v for k, v in p.items()}
            )
        for c in copies:
            c["locked_ok"] = fx.make_unwritable(c["locked"])
        yield copies
    finally:
        for c in copies:
            fx.make_writable(c["locked"])


def _run_batches(copies: list[dict], tmp: Path) -> tuple[list, dict[str, dict]]:
    """Every case, spread over one subprocess per copy of the fixtures (run at the same time)."""
    table = cases(copies[0])
    procs = []
    for i, p in enumerate(copies):
        part = [{"id": cid, "argv": argv} for cid, argv, _ in cases(p)[i :: len(copies)]]
        cases_file, results_file = tmp / f"cases{i}.json", tmp / f"results{i}.json"
        cases_file.write_text(json.dumps(part))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        command = [
            sys.executable,
            str(HERE / "cli_batch.py"),
            str(cases_file),
            str(results_file),
            str(p["root"]),
        ]
        procs.append((subprocess.Popen(command, env=env, cwd=tmp), results_file, p))
    results = {}
    for proc, results_file, p in procs:
        assert proc.wait(timeout=900) == 0
        for r in json.loads(results_file.read_text()):
            r["needles"] = next(n for cid, _, n in cases(p) if cid == r["id"])
            results[r["id"]] = r
    return table, results


def test_bad_input_table(fixtures, tmp_path):
    if not all(c["locked_ok"] for c in fixtures):
        pytest.skip("cannot make a folder unwritable here (chattr +i refused)")
    table, results = _run_batches(fixtures, tmp_path)
    assert len(table) >= 100 and len({c[0] for c in table}) == len(table) == len(results)
    failures = []
    for cid, _, _ in table:
        r = results[cid]
        problems = []
        if r["code"] != 2:
            problems.append(f"exit {r['code']}")
        if "Traceback" in r["stderr"]:
            problems.append("traceback")
        message = "\n".join(line for line in r["stderr"].splitlines() if "error:" in line)
        missing = [n for n in r["needles"] if n not in message]
        if missing:
            problems.append(f"message lacks {missing}")
        if cid in FORBIDDEN and FORBIDDEN[cid] in message:
            problems.append(f"message mentions {FORBIDDEN[cid]!r}")
        if r["changed"]:
            problems.append(f"changed {r['changed'][:5]}")
        if problems:
            failures.append(f"{cid}: {'; '.join(problems)}\n    stderr: {r['stderr'].strip()[-700:]!r}")
    print(f"{len(table)} bad-input cases, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(table)} cases:\n" + "\n".join(failures)
