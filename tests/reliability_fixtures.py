"""Small real artefacts for the reliability tests (no tests here): a byte-level BPE tokenizer trained on the spot, a
tiny model folder of its vocabulary, a dataset, a training run with checkpoints, and broken variants of each.
Everything is built by the package's own writers, as a user's files would be; nothing needs ../shared."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

TEXTS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "a model reads tokens and predicts the next one; training lowers the loss. " * 3,
    "checkpoints are written beside the target and renamed when complete. " * 3,
    "hello world, how are you today? I am fine, thank you. 12 + 34 = 46. " * 3,
]


def tokenizer(vocab_size: int = 300):
    from qwen15.demo.bpe import train_bpe

    return train_bpe(TEXTS * 20, vocab_size)


def model_config(vocab_size: int, max_positions: int = 64):
    from qwen15.model_config import get_preset

    return get_preset("tiny").replace(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )


def save_model(folder: Path, tok, *, vocab_size: int | None = None, max_positions: int = 64, seed: int = 0):
    from qwen15 import Qwen

    model = Qwen.from_config(model_config(vocab_size or len(tok), max_positions), seed=seed)
    model.save_pretrained(str(folder), tokenizer=tok)
    return model


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes (to show that a command left them as they were)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def artifacts(root: Path, rows: int = 40) -> dict:
    """A tokenizer folder, its size and a dataset of its ids (`rows` rows) under `root`."""
    tok = tokenizer()
    tok.save_pretrained(root / "tok")
    return {"root": root, "tok": root / "tok", "vocab": len(tok), "data": dataset(root / "data", tok, n=rows)}


def dataset(folder: Path, tok, seq: int = 16, n: int = 40) -> Path:
    from qwen15.data.writer import write_documents

    ids = tok.encode(" ".join(TEXTS))
    docs = [(ids[i : i + 20], [True] * 20) for i in range(0, 20 * n, 7)][:n]
    docs = [(d * 3, m * 3) for d, m in docs if d]
    return write_documents(
        folder,
        docs,
        seq_length=seq,
        layout="pack",
        type="chat",
        vocab_size=len(tok),
        tokenizer_fingerprint=tok.fingerprint,
    )


def finetune_overrides(data: Path, run: Path, model: Path) -> list[str]:
    """A finetune of a model folder (no shape keys: the folder's config.json gives the shape)."""
    base = train_overrides(data, run, model, 0, train__mode="finetune")
    out = []
    for key, value in zip(base[::2], base[1::2]):
        if key.startswith("--model.") and key != "--model.tokenizer":
            continue
        out += [key, value]
    return [*out, "--model.path", str(model)]


def train_overrides(data: Path, run: Path, tok_dir: Path, vocab_size: int, **changes) -> list[str]:
    values = {
        "model.preset": "tiny",
        "model.vocab_size": vocab_size,
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_hidden_layers": 1,
        "model.num_attention_heads": 2,
        "model.num_key_value_heads": 2,
        "model.max_position_embeddings": 64,
        "model.tokenizer": str(tok_dir),
        "data.path": str(data),
        "train.run_dir": str(run),
        "train.steps": 2,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.device": "cpu",
        "optim.lr": 1e-3,
        "checkpoint.every": 1,
        "metrics.plot": False,
        "metrics.tensorboard": False,
    }
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    out = []
    for k, v in values.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def rank_file(path: Path, n_merges: int = 10) -> Path:
    """A tiktoken rank file: the 256 bytes, then merges of pairs of them."""
    tokens = [bytes([b]) for b in range(256)]
    letters = b"etaoinshrd"
    for i in range(n_merges):
        tokens.append(bytes([letters[i % 10], letters[(i + 1) % 10]]))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def make_unwritable(folder: Path) -> bool:
    """No file can be created in `folder`, even by root (an immutable folder); False when that cannot be done."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    return done.returncode == 0


def make_writable(folder: Path) -> None:
    if not folder.exists():
        return
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    else:
        folder.chmod(0o755)


def build(root: Path) -> dict[str, Path]:
    """The artefacts, by name, under `root` (which must not exist yet)."""
    from qwen15.cli import main

    root.mkdir(parents=True)
    p: dict[str, Path] = {"root": root}
    tok = tokenizer()
    tok.save_pretrained(root / "tok")
    p["tok"] = root / "tok"
    p["vocab"] = len(tok)
    big = tokenizer(400)
    assert len(big) > len(tok) + 20
    big.save_pretrained(root / "bigtok")
    p["bigtok"] = root / "bigtok"
    p["model"] = root / "model"
    save_model(p["model"], tok)
    p["model_long"] = root / "model_long"  # a context of 256 positions, as the demo's model
    save_model(p["model_long"], tok, max_positions=256)

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(p["model"] / "model.safetensors"))
    p["model_nan"] = root / "model_nan"
    shutil.copytree(p["model"], p["model_nan"])
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        str(p["model_nan"] / "model.safetensors"),
    )
    p["model_bin"] = root / "model_bin"
    p["model_bin"].mkdir()
    shutil.copy(p["model"] / "config.json", p["model_bin"])
    (p["model_bin"] / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(p["tok"] / name, p["model_bin"])
    p["model_trunc"] = root / "model_trunc"
    shutil.copytree(p["model"], p["model_trunc"])
    f = p["model_trunc"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p["model_badcfg"] = root / "model_badcfg"
    shutil.copytree(p["model"], p["model_badcfg"])
    (p["model_badcfg"] / "config.json").write_text('{"hidden_size": 32,\n  "vocab_size": }\n')
    p["model_nocfg"] = root / "model_nocfg"
    shutil.copytree(p["model"], p["model_nocfg"])
    (p["model_nocfg"] / "config.json").unlink()

    p["model_wrongtype"] = root / "model_wrongtype"  # a config.json value of the wrong type
    shutil.copytree(p["model"], p["model_wrongtype"])
    config = json.loads((p["model"] / "config.json").read_text())
    (p["model_wrongtype"] / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
    p["model_shape"] = root / "model_shape"  # config.json of another shape than the weights
    shutil.copytree(p["model"], p["model_shape"])
    (p["model_shape"] / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    p["model_noweights"] = root / "model_noweights"
    p["model_noweights"].mkdir()
    shutil.copy(p["model"] / "config.json", p["model_noweights"])
    p["tok_badvocab"] = root / "tok_badvocab"
    shutil.copytree(p["tok"], p["tok_badvocab"])
    (p["tok_badvocab"] / "vocab.json").write_text("{not json")
    (p["tok_badvocab"] / "tokenizer.json").unlink()

    p["data"] = dataset(root / "data", tok)
    p["data_trunc"] = root / "data_trunc"
    shutil.copytree(p["data"], p["data_trunc"])
    f = p["data_trunc"] / "tokens.npy"
    f.write_bytes(f.read_bytes()[:200])
    p["data_badmeta"] = root / "data_badmeta"
    shutil.copytree(p["data"], p["data_badmeta"])
    meta = json.loads((p["data"] / "meta.json").read_text())
    (p["data_badmeta"] / "meta.json").write_text(json.dumps({**meta, "seq_length": "x"}))
    p["run"] = root / "run"
    assert main(["train", *train_overrides(p["data"], p["run"], p["tok"], len(tok))]) == 0
    ckpt = p["run"] / "checkpoints" / "step-00000002"
    p["ckpt"] = ckpt
    p["ckpt_trunc"] = root / "damaged" / "trunc" / "step-00000002"
    shutil.copytree(ckpt, p["ckpt_trunc"])
    distcp = sorted((p["ckpt_trunc"] / "state").glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[:100])
    p["ckpt_badstate"] = root / "damaged" / "badstate" / "step-00000002"
    shutil.copytree(ckpt, p["ckpt_badstate"])
    (p["ckpt_badstate"] / "trainer_state.json").write_text('{"step": 2,')
    p["ckpt_nometa"] = root / "damaged" / "nometa" / "step-00000002"
    shutil.copytree(ckpt, p["ckpt_nometa"])
    (p["ckpt_nometa"] / "state" / ".metadata").unlink()
    p["ckpt_badconfig"] = root / "damaged" / "badconfig" / "step-00000002"
    shutil.copytree(ckpt, p["ckpt_badconfig"])
    (p["ckpt_badconfig"] / "config.json").write_text("{")
    p["ckpt_incomplete"] = root / "damaged" / "incomplete" / "step-00000002"
    shutil.copytree(ckpt, p["ckpt_incomplete"])
    (p["ckpt_incomplete"] / "COMPLETE").unlink()
    p["export"] = root / "export"  # a Hugging Face folder written by convert
    assert main(["convert", "--to", "hf", str(ckpt), str(p["export"])]) == 0

    files = {
        "alpaca": '[{"instruction": "Add 1 and 2.", "input": "", "output": "3"}]\n',
        "alpaca_bad": '[{"instruction": "Add", "input": "", "output": "3"},\n {"instruction": 5\n',
        "chat": json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}
        )
        + "\n",
        "chat_bad": '{"messages": [{"role": "user", "content": "hi"}\n',
        "text": "hello world, this is a text.\n\nanother block of text.\n",
        "empty": "",
        "notes": "my own notes, not written by qwen15\n",
        "recipe": "model:\n  preset: tiny\ndata:\n  path: x\ntrain:\n  steps: 3\n",
        "recipe_bad_value": "model:\n  preset: tiny\ndata:\n  path: x\ntrain:\n  steps: 3\n  global_batch_size: -4\n",
        "recipe_malformed": "model:\n  preset: tiny\ndata: [unclosed\n",
        "ranks_empty": "",
        "ranks_bad": "!!!notbase64 0\n",
        "ranks_gap": "YQ== 0\nYg== 5\n",
        "question": "what is one plus two? " * 40,
    }
    for name, text in files.items():
        suffix = {"alpaca": ".json", "alpaca_bad": ".json", "chat": ".jsonl", "chat_bad": ".jsonl"}.get(
            name, ".txt"
        )
        if name.startswith("recipe"):
            suffix = ".yaml"
        p[name] = root / f"{name}{suffix}"
        p[name].write_text(text, encoding="utf-8")
    p["latin1"] = root / "latin1.txt"
    p["latin1"].write_bytes("line one\nline two\ncaf\xe9 au lait\n".encode("latin-1"))
    p["latin1_chat"] = root / "latin1_chat.jsonl"
    p["latin1_chat"].write_bytes(
        files["chat"].encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    )
    p["recipe_latin1"] = root / "recipe_latin1.yaml"
    p["recipe_latin1"].write_bytes(b"model:\n  preset: tiny\n# caf\xe9\n")
    p["ranks"] = rank_file(root / "ranks.tiktoken")
    p["ranks_binary"] = root / "ranks_binary.tiktoken"
    p["ranks_binary"].write_bytes(bytes(range(256)) * 4)
    p["tiktok"] = root / "tiktok"  # a tokenizer folder written by from-tiktoken
    assert main(["tokenizer", "from-tiktoken", str(p["ranks"]), str(p["tiktok"])]) == 0
    p["dir"] = root / "a_folder"
    p["dir"].mkdir()
    p["userdir"] = root / "userdir"  # a user's folder with their own files
    p["userdir"].mkdir()
    (p["userdir"] / "thesis.tex").write_text("years of work\n")
    p["D"] = root / "D"  # the data folder of the issue: raw input beside unrelated files
    p["D"].mkdir()
    shutil.copy(p["chat"], p["D"] / "raw.jsonl")
    (p["D"] / "unrelated.txt").write_text("keep me\n")
    p["existing_ds"] = root / "existing_ds"
    assert main(["data", "preprocess", "--type", "text", "--input", str(p["text"]), "--tokenizer", str(p["tok"]),
                 "--seq-length", "4", "--output", str(p["existing_ds"]), "--quiet"]) == 0  # fmt: skip
    p["existing_jsonl"] = root / "existing.jsonl"
    assert (
        main(["data", "alpaca-to-chat", "--input", str(p["alpaca"]), "--output", str(p["existing_jsonl"])])
        == 0
    )
    p["locked"] = root / "locked"
    p["locked_ok"] = make_unwritable(p["locked"])
    p["new"] = root / "new"  # outputs that must not come into being
    return p
