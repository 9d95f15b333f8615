"""GGUF export (qwen15.gguf_export, `qwen15 convert --to gguf`) against three oracles:

(a) llama.cpp's own convert_hf_to_gguf.py on the same folder writes the same tensors (names, order, shapes, types,
    bytes) and the same metadata but for provenance (general.name); our q4_0 equals `llama-quantize --pure` of
    its f32 file. Needs llama.cpp's cache (bench/llamacpp.py builds it): skipped without it, as in CI.
(b) gguf's own reader and numpy dequantizer give back the safetensors weights (exactly for f32/f16/bf16, within
    the format's rounding for q8_0/q4_0), and the token list and merges are those of the tokenizer's files.
(c) llama.cpp's llama-completion decodes greedily the same tokens as qwen15's generate on the same folder.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reliability_fixtures as fx

from conftest import SHARED_TOKENIZER

gguf = pytest.importorskip("gguf")

LLAMACPP = Path(os.environ.get("QWEN15_BENCH_CACHE", Path.home() / ".cache" / "qwen15-bench")) / "llamacpp"
CONVERTER = LLAMACPP / "src" / "convert_hf_to_gguf.py"
BIN = LLAMACPP / "build" / "bin"
needs_converter = pytest.mark.skipif(
    not CONVERTER.is_file(),
    reason=f"llama.cpp's sources are absent ({LLAMACPP}; `python bench/llamacpp.py build`)",
)
needs_real_tokenizer = pytest.mark.skipif(
    not SHARED_TOKENIZER.is_dir(), reason=f"{SHARED_TOKENIZER} is absent"
)
# general.* keys that say where a file came from; every other key must be equal
KEPT_GENERAL = {"general.architecture", "general.type", "general.size_label", "general.file_type"}
KEPT_GENERAL.add("general.quantization_version")


def save_model(
    folder: Path, config, tokenizer, dtype, seed: int = 0, matrix_std: float | None = None
) -> Path:
    """A model folder of random weights written by qwen15 (norms and biases away from 1 and 0 so that a
    swapped or dropped tensor shows; matrix_std: matrices of that spread, whose greedy tokens vary)."""
    import torch

    from qwen15 import Qwen

    model = Qwen.from_config(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and matrix_std:
                p.copy_(torch.randn(p.shape, generator=g) * matrix_std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    model.to(dtype).save_pretrained(str(folder), tokenizer=tokenizer)
    return folder


def shapes(name: str):
    from qwen15.model_config import get_preset

    return {
        "tiny": get_preset("tiny"),  # tied, head_dim 64 (0.5B-like)
        # untied GQA, and a feed-forward width (336) that Q8_0/Q4_0 blocks do not divide: ffn_down falls back
        "tiny-gqa": get_preset("tiny-gqa").replace(intermediate_size=336),
        "0.5b-2layers": get_preset("qwen1.5-0.5b").replace(num_hidden_layers=2),
    }[name]


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory):
    """name -> Hugging Face folder with the real Qwen1.5 tokenizer (made on first use)."""
    import torch

    from qwen15 import Tokenizer

    if not SHARED_TOKENIZER.is_dir():
        pytest.skip(f"{SHARED_TOKENIZER} is absent")
    root = tmp_path_factory.mktemp("gguf")
    tok = Tokenizer.from_pretrained(SHARED_TOKENIZER)
    made: dict[str, Path] = {}
    dtypes = {"tiny": torch.bfloat16, "tiny-gqa": torch.float32, "0.5b-2layers": torch.bfloat16}

    def get(name: str) -> Path:
        """`name`, or `run-name`: f32 matrices of spread 0.1, whose greedy tokens vary (for llama.cpp's run)."""
        if name not in made:
            shape = name.removeprefix("run-")
            dtype, std = (torch.float32, 0.1) if name.startswith("run-") else (dtypes[name], None)
            made[name] = save_model(root / name, shapes(shape), tok, dtype, matrix_std=std)
        return made[name]

    return get


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {
    0: "u1",
    1: "i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


def read(path: Path) -> tuple[dict, list]:
    """(key -> (value type, value), [(name, type, shape, bytes)]) of a GGUF file, parsed here from the format's
    description (gguf's GGUFReader takes ~25 s over the 300k strings of Qwen's vocabulary and merges on this
    machine; it reads the small files below)."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n : pos].decode("utf-8")

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype != 9:
            return take(_SCALARS[vtype])
        sub, n = take("I"), take("Q")
        if sub == 8:  # a string array (the vocabulary, the merges): kept as raw bytes, read in one lean loop
            items, unpack = [], struct.Struct("<Q").unpack_from
            for _ in range(n):
                (length,) = unpack(buf, pos)
                items.append(buf[pos + 8 : pos + 8 + length])
                pos += 8 + length
            return (sub, items)
        if sub == 9:
            return (sub, [value(sub) for _ in range(n)])
        arr = np.frombuffer(buf, _NUMPY[sub], n, pos)
        pos += arr.nbytes
        return (sub, arr.tolist())

    assert take("I") == 0x46554747 and take("I") == 3  # b"GGUF", version 3
    n_tensors, n_kv = take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        kv[key] = (vtype, value(vtype))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, gguf.GGMLQuantizationType(take("I")), tuple(dims), take("Q")))
    align = kv.get("general.alignment", (4, 32))[1]
    start = -(-pos // align) * align
    tensors = []
    for name, qtype, dims, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims[1:])) * dims[0] // block * size
        tensors.append((name, qtype.name, dims, buf[start + offset : start + offset + nbytes]))
    return kv, tensors


def differences(ours: Path, theirs: Path, same_order: bool = True) -> list[str]:
    (ka, ta), (kb, tb) = read(ours), read(theirs)
    out = []
    kept = lambda kv: {k: v for k, v in kv.items() if not k.startswith("general.") or k in KEPT_GENERAL}  # noqa: E731
    ka, kb = kept(ka), kept(kb)
    out += [
        f"key {k} only in {w}"
        for w, a, b in (("ours", ka, kb), ("theirs", kb, ka))
        for k in sorted(set(a) - set(b))
    ]
    out += [f"key {k}: {str(ka[k])[:200]} != {str(kb[k])[:200]}" for k in ka if k in kb and ka[k] != kb[k]]
    if same_order and [t[0] for t in ta] != [t[0] for t in tb]:
        out.append(f"tensor order {[t[0] for t in ta][:6]}... != {[t[0] for t in tb][:6]}...")
    da, db = {t[0]: t for t in ta}, {t[0]: t for t in tb}
    out += [f"tensor {n} only in one file" for n in sorted(set(da) ^ set(db))]
    for n in sorted(set(da) & set(db)):
        (_, qa, sa, ba), (_, qb, sb, bb) = da[n], db[n]
        if (qa, sa) != (qb, sb) or ba != bb:
            out.append(
                f"tensor {n}: ours {qa} {sa}, theirs {qb} {sb}, bytes {'equal' if ba == bb else 'differ'}"
            )
    return out


def export(folder: Path, out: Path, kind: str) -> Path:
    from qwen15.gguf_export import export_gguf

    export_gguf(folder, out, kind, quiet=True)
    return out


# ---------------------------------------------------------------------------------------------- (a) llama.cpp


def llama_cpp_convert(folder: Path, kind: str, out: Path) -> Path:
    env = dict(os.environ, PYTHONPATH=str(CONVERTER.parent / "gguf-py"))
    cmd = [sys.executable, str(CONVERTER), str(folder), "--outtype", kind, "--outfile", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", done.stderr)
    if missing:  # the oracle's own requirement, not a fault of ours
        pytest.skip(f"llama.cpp's converter needs the Python module {missing.group(1)!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# Each converter run and each export spends ~5 s on the 151k-token vocabulary, so every type is checked on
# the shape where it can go wrong: the fp32 source is rounded to f16/bf16, its 336-wide ffn_down falls back
# from Q8_0/Q4_0 blocks; the bf16 0.5B width (tied: no output tensor, as the tiny shape) is copied to bf16 and
# quantized.
CONVERTER_KINDS = {"tiny-gqa": ("f32", "f16", "bf16", "q8_0"), "0.5b-2layers": ("f32", "bf16", "q8_0")}
QUANTIZE_KINDS = {"tiny-gqa": ("q4_0", "q8_0"), "0.5b-2layers": ("q4_0",)}


@pytest.mark.slow
@needs_converter
@pytest.mark.parametrize("shape", ["tiny-gqa", "0.5b-2layers"])
def test_same_file_as_llama_cpp_converter(real_folders, shape, tmp_path):
    folder = real_folders(shape)
    for kind in CONVERTER_KINDS[shape]:
        theirs = llama_cpp_convert(folder, kind, tmp_path / f"theirs-{kind}.gguf")
        ours = export(folder, tmp_path / f"ours-{kind}.gguf", kind)
        assert differences(ours, theirs) == [], kind
        if kind != "f32":
            theirs.unlink()
            ours.unlink()
    if QUANTIZE_KINDS[shape] and not (BIN / "llama-quantize").is_file():
        pytest.skip(f"{BIN / 'llama-quantize'} is absent; f32/f16/bf16/q8_0 matched")
    # q4_0 (which llama.cpp's converter does not write) and q8_0 again, against ggml's own C quantizer:
    # llama-quantize --pure (every matrix in the type) of the converter's f32 file
    for kind in QUANTIZE_KINDS[shape]:
        pure = tmp_path / f"theirs-pure-{kind}.gguf"
        cmd = [
            str(BIN / "llama-quantize"),
            "--pure",
            str(tmp_path / "theirs-f32.gguf"),
            str(pure),
            kind.upper(),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        ours = export(folder, tmp_path / f"ours-{kind}.gguf", kind)
        assert differences(ours, pure, same_order=False) == [], kind
        pure.unlink()
        ours.unlink()


def test_tensor_type_rule():
    """The converter's rule, on names and shapes alone."""
    from qwen15.gguf_export import tensor_type

    q = gguf.GGMLQuantizationType
    assert tensor_type("blk.0.attn_q.weight", (64, 64), q.Q8_0) == q.Q8_0
    assert tensor_type("blk.0.attn_q.bias", (64,), q.Q8_0) == q.F32
    assert tensor_type("blk.0.attn_norm.weight", (64,), q.BF16) == q.F32
    assert tensor_type("blk.0.ffn_down.weight", (64, 80), q.Q4_0) == q.F16  # 80 columns: no whole Q4_0 blocks
    assert tensor_type("blk.0.ffn_down.weight", (64, 80), q.BF16) == q.BF16


# ---------------------------------------------------------------------------------------------- (b) read back


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """A model of a small trained vocabulary (no ../shared needed): f32 weights; the feed-forward width 80 is no
    multiple of 32, so ffn_down takes the F16 fallback in q8_0/q4_0."""
    import torch

    tok = fx.tokenizer(300)
    config = fx.model_config(len(tok)).replace(hidden_size=64, intermediate_size=80, num_hidden_layers=2)
    config = config.replace(tie_word_embeddings=False, num_key_value_heads=1)
    return save_model(tmp_path_factory.mktemp("small") / "model", config, tok, torch.float32)


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


GGUF_OF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    """llama.cpp's names for Qwen2 (written out here, not taken from the gguf package the exporter uses)."""
    if hf in GGUF_OF:
        return GGUF_OF[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    mapped = GGUF_OF.get(rest) or f"{GGUF_OF[module]}.{kind}"
    return f"blk.{layer}.{mapped}"


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_weights_read_back(small_folder, kind, tmp_path):
    out = export(small_folder, tmp_path / "m.gguf", kind)
    reader = gguf.GGUFReader(out)
    found = {t.name: t for t in reader.tensors}
    ref = weights(small_folder)
    assert set(found) == {gguf_name(k) for k in ref}
    wanted = gguf.GGMLQuantizationType[kind.upper()]
    for hf, w in ref.items():
        t = found[gguf_name(hf)]
        assert tuple(int(n) for n in t.shape) == w.shape[::-1]  # GGML lists dimensions innermost first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, w), hf
            continue
        if kind in ("q8_0", "q4_0") and w.shape[1] % 32:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, hf
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32)), hf
            continue
        assert t.tensor_type == wanted, hf
        if kind == "f32":
            assert np.array_equal(got, w), hf
        elif kind == "f16":
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32)), hf
        elif kind == "bf16":
            import torch

            assert np.array_equal(got, torch.from_numpy(w).bfloat16().float().numpy()), hf
        else:  # one scale per 32 values: q8_0 rounds to d = absmax/127, q4_0 to d = absmax/8 (the far end clips)
            blocks, err = w.reshape(-1, 32), np.abs(got - w).reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / (127 if kind == "q8_0" else 8)
            # ... and d itself to float16 (relative 2**-11, or 2**-25 absolute below float16's normal range)
            half, qmax = (0.5, 127) if kind == "q8_0" else (1.0, 8)
            assert (err <= d * (half + qmax * 2**-11) + qmax * 2**-25).all(), hf
            assert np.sqrt((err**2).mean()) <= 0.35 * np.sqrt((d**2).mean()), hf  # rounding, not worse


@needs_real_tokenizer
def test_tokenizer_and_shape_metadata(real_folders, tmp_path):
    folder = real_folders("tiny")
    kv, _ = read(export(folder, tmp_path / "m.gguf", "q8_0"))

    def value(key: str):
        if kv[key][0] != 9:
            return kv[key][1]
        items = kv[key][1][1]
        return [i.decode("utf-8") for i in items] if kv[key][1][0] == 8 else items

    config = json.loads((folder / "config.json").read_text())
    vocab = json.loads((SHARED_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    tok_config = json.loads((SHARED_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {int(i): spec["content"] for i, spec in tok_config["added_tokens_decoder"].items()}
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config["vocab_size"] == 151936
    expected = {i: t for t, i in vocab.items()} | added
    assert tokens[: len(expected)] == [expected[i] for i in range(len(expected))]
    assert tokens[len(expected) :] == [f"[PAD{i}]" for i in range(len(expected), 151936)]
    assert types == [1] * len(vocab) + [3] * len(added) + [5] * (151936 - len(expected))
    lines = (SHARED_TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert value("tokenizer.ggml.merges") == [m for m in lines if m and not m.startswith("#version")]
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "qwen2"
    assert value("tokenizer.ggml.eos_token_id") == value("tokenizer.ggml.padding_token_id") == 151643
    assert value("tokenizer.ggml.bos_token_id") == config["bos_token_id"] == 151643
    assert value("tokenizer.chat_template") == tok_config["chat_template"]
    for key, hf in (
        ("block_count", "num_hidden_layers"),
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
    ):
        assert value(f"qwen2.{key}") == config[hf], key
    assert value("qwen2.rope.freq_base") == np.float32(config["rope_theta"])
    assert value("qwen2.attention.layer_norm_rms_epsilon") == np.float32(config["rms_norm_eps"])
    assert value("general.architecture") == "qwen2" and value("general.file_type") == 7  # MOSTLY_Q8_0


def test_cli_from_a_training_checkpoint(tmp_path):
    """`convert --to gguf` of a run directory: its latest checkpoint, exported exactly (f32) through a temporary
    folder that is gone afterwards; a second run needs --overwrite."""
    from qwen15.cli import main

    art = fx.artifacts(tmp_path / "a", rows=8)
    run = tmp_path / "run"
    assert main(["train", *fx.train_overrides(art["data"], run, art["tok"], art["vocab"])]) == 0
    hf = tmp_path / "hf"
    assert main(["convert", "--to", "hf", str(run), str(hf), "--dtype", "float32"]) == 0
    out = tmp_path / "out" / "run.gguf"
    assert main(["convert", "--to", "gguf", str(run), str(out), "--gguf-type", "f32", "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.gguf"]
    assert differences(out, export(hf, tmp_path / "direct.gguf", "f32")) == []
    assert read(out)[0]["general.name"][1] == "run"
    assert main(["convert", "--to", "gguf", str(run), str(out), "--quiet"]) == 2
    assert main(["convert", "--to", "gguf", str(run), str(out), "--quiet", "--overwrite"]) == 0
    assert read(out)[0]["general.file_type"][1] == 1  # f16, the default


# ---------------------------------------------------------------------------------------------- (c) llama.cpp runs it


def session_tokens(path: Path) -> list[int]:
    """The token ids at the head of a llama.cpp session file (magic, version, count, int32 ids)."""
    data = path.read_bytes()
    magic, _version, n = struct.unpack("<III", data[:12])
    assert magic == 0x6767736E  # 'ggsn'
    return list(struct.unpack(f"<{n}i", data[12 : 12 + 4 * n]))


@needs_real_tokenizer
@pytest.mark.skipif(not (BIN / "llama-completion").is_file(), reason=f"{BIN / 'llama-completion'} is absent")
# tied (no output.weight); untied GQA (slow: ~25 s here, its two 151936-row tables in f32)
@pytest.mark.parametrize("shape", ["tiny", pytest.param("tiny-gqa", marks=pytest.mark.slow)])
def test_llama_cpp_generates_the_same_tokens(real_folders, shape, tmp_path):
    """f32 random weights and the real tokenizer: llama.cpp's greedy tokens (read from the session file it saves,
    prompt included) equal qwen15's."""
    import torch

    from qwen15 import Qwen, Tokenizer, generate

    folder = real_folders(f"run-{shape}")
    model_file = export(folder, tmp_path / "m.gguf", "f32")
    prompt, n = "The quick brown fox jumps over", 16
    session = tmp_path / "session.bin"
    cmd = [
        str(BIN / "llama-completion"), "-m", str(model_file), "-p", prompt, "-n", str(n), "--temp", "0",
        "-no-cnv", "-t", "2", "-c", "64", "--no-warmup", "--ignore-eos", "--prompt-cache", str(session),
        "--prompt-cache-all",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = session_tokens(session)
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(folder)
    ids = tok.encode(prompt)
    ours = generate(
        Qwen.from_pretrained(str(folder)), tok, prompt, max_new_tokens=n, temperature=0, stop_token_ids=[]
    )
    assert theirs[: len(ids)] == ids  # llama.cpp tokenized the prompt as we do (no BOS)
    assert theirs[len(ids) :] == ours.token_ids
    assert len(set(ours.token_ids)) > 3  # not one token repeated: the comparison says something
    assert done.stdout.startswith(prompt + ours.text)


def test_cli_offers_the_exporter_types():
    import argparse

    from qwen15.commands import convert
    from qwen15.gguf_export import GGUF_TYPES

    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    assert next(a for a in parser._actions if a.dest == "gguf_type").choices == list(GGUF_TYPES)
