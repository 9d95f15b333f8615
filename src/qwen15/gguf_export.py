"""Hugging Face Qwen1.5 folder -> one GGUF file for llama.cpp (architecture "qwen2"), laid out as llama.cpp's own
convert_hf_to_gguf.py writes a Qwen2ForCausalLM: the same tensor names, types and bytes, the same metadata
(tests/test_gguf_export.py compares the two files). The `gguf` package (extra `qwen15[gguf]`) writes the format
and quantizes; the weights stream through in row blocks, so memory holds one block, not the model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.atomic import atomic_file, check_output_file
from qwen15.errors import UserError
from qwen15.hf_folder import TensorEntry, check_names, weight_entries
from qwen15.model_config import ModelConfig
from qwen15.tokenizer import QWEN_SPLIT_PATTERN, Tokenizer

# --gguf-type -> the file type llama.cpp records for it (general.file_type)
GGUF_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
}
_BLOCK_BYTES = 16 << 20  # source bytes read, converted and written at a time


class GGUFExportError(UserError):
    """A folder that cannot become a GGUF file; the message names the file or tensor and what to do."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError(
            "writing GGUF needs the gguf package: pip install 'qwen15[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def is_gguf_file(path: Path) -> bool:
    """A file that starts with GGUF's magic (what --overwrite may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


_RULE = {"flag": "OUT", "looks_ours": is_gguf_file, "what": "GGUF file"}


def check_output(out_file: str | os.PathLike, *, overwrite: bool, inputs: Iterable = ()) -> Path:
    """The output rule for OUT.gguf, checked before any work (an existing file: --overwrite, and GGUF only)."""
    return check_output_file(out_file, overwrite=overwrite, inputs=inputs, **_RULE)


@dataclass
class Planned:
    """One GGUF tensor: its name, shape (PyTorch order), GGML type and the safetensors entry it comes from."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    entry: TensorEntry

    def row_bytes(self) -> int:
        block, size = _gguf().GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * size

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * self.row_bytes()


def tensor_type(name: str, shape: tuple[int, ...], wanted):
    """convert_hf_to_gguf.py's rule: vectors, norms and anything not a `.weight` stay F32; a matrix whose rows
    do not divide into the quantized blocks falls back to F16; every other matrix gets the wanted type."""
    q = _gguf().GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return q.F32
    block = _gguf().GGML_QUANT_SIZES[wanted][0]
    return q.F16 if shape[-1] % block else wanted


def plan_tensors(folder: Path, config: ModelConfig, gguf_type: str) -> list[Planned]:
    """The folder's tensors under GGUF names, in the converter's order (files sorted, names sorted in each); a
    tied lm_head is left out (llama.cpp reads the token table as the output matrix)."""
    import torch

    from qwen15.hf_checkpoint import hf_state_dict
    from qwen15.model import Qwen

    gguf = _gguf()
    entries = weight_entries(folder)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in hf_state_dict(Qwen(config)).items()}
    check_names(expected, {k: e.shape for k, e in entries.items()}, config.tie_word_embeddings, str(folder))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]
    planned = []
    for hf, entry in sorted(entries.items(), key=lambda kv: (str(kv[1].file), kv[0])):
        if hf.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and hf == "lm_head.weight"):
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:  # check_names let it through, so this is a bug here, not in the folder
            raise AssertionError(f"no GGUF name for {hf}")
        if entry.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise GGUFExportError(
                f"{entry.file}: tensor {hf!r} is {entry.dtype}; expected floating-point weights"
            )
        planned.append(Planned(name, entry.shape, tensor_type(name, entry.shape, wanted), entry))
    return planned


def _as_float(block: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as the converter hands them to the quantizer: float16 and float32 as they are, bfloat16
    (held as its uint16 bits) and float64 widened or narrowed to float32."""
    if dtype == "bfloat16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block if dtype in ("float16", "float32") else block.astype(np.float32)


class _Streamed:
    """What GGUFWriter asks of a tensor (dtype, shape in bytes, nbytes, tofile), made block by block while the
    writer writes it: each block of rows quantizes to the same bytes as the whole tensor would (GGML's blocks lie
    within a row)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, t: Planned, on_bytes: Callable[[int], None]):
        self.t, self.on_bytes = t, on_bytes
        self.nbytes = t.nbytes
        self.shape = (*t.shape[:-1], t.row_bytes())

    def tofile(self, f) -> None:
        t, gguf = self.t, _gguf()
        rows = t.shape[0]  # of a vector: its elements
        step = max(1, _BLOCK_BYTES // max(1, (t.entry.end - t.entry.begin) // rows))
        written = 0
        for r0 in range(0, rows, step):
            block = t.entry.read_rows(r0, min(rows, r0 + step))
            data = gguf.quants.quantize(_as_float(block, t.entry.dtype), t.qtype)
            raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            f.write(raw.data)
            written += raw.nbytes
            self.on_bytes(block.nbytes)
        if written != self.nbytes:
            raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {self.nbytes}")


def token_table(tokenizer: Tokenizer, vocab_size: int, where: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as the converter lists a byte-level BPE vocabulary: one entry per embedding
    row, `[PADi]` (unused) for rows no token has, added tokens as control (special, or `<|...|>`) or user-defined
    tokens. Also refuses a tokenizer whose pre-tokenizer is not Qwen's (llama.cpp's "qwen2" would split text
    differently) or that has more ids than the model has rows."""
    gguf = _gguf()
    spec = json.loads(tokenizer.backend.to_str())
    if QWEN_SPLIT_PATTERN not in _split_patterns(spec.get("pre_tokenizer")):
        raise GGUFExportError(
            f"{where}: the tokenizer's pre-tokenizer is not Qwen's split; llama.cpp's 'qwen2' pre-tokenizer would "
            "tokenize text differently. Export a model with a Qwen tokenizer"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(
            f"{where}: the tokenizer has ids up to {max(vocab.values())} but the model has {vocab_size} embedding "
            "rows (config.json vocab_size); the tokenizer does not belong to these weights"
        )
    added = tokenizer.backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            if not added[i].normalized:  # as the converter: llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token))
            if added[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _split_patterns(spec: Any) -> list[str]:
    """The regular expressions of every Split step in a `tokenizers` pre-tokenizer spec."""
    if isinstance(spec, list):
        return [p for item in spec for p in _split_patterns(item)]
    if not isinstance(spec, dict):
        return []
    found = (
        [spec["pattern"].get("Regex")]
        if spec.get("type") == "Split" and isinstance(spec.get("pattern"), dict)
        else []
    )
    return found + _split_patterns(spec.get("pretokenizers"))


@dataclass
class Summary:
    path: Path
    gguf_type: str
    tensors: int
    bytes: int
    seconds: float


def export_gguf(
    hf_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    gguf_type: str = "f16",
    *,
    name: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    quiet: bool = False,
) -> Summary:
    """Write `out_file` (GGUF, `gguf_type` one of GGUF_TYPES) from a Hugging Face Qwen1.5 folder with its
    tokenizer, by the output rule of qwen15.atomic (built beside the target and renamed; an existing GGUF file
    replaced only with overwrite; never the folder or one of `inputs`). `name` is general.name (default: the
    folder's name)."""
    start = time.perf_counter()
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise GGUFExportError(f"{folder}: not a Hugging Face model folder (no config.json)")
    check_output(out_file, overwrite=overwrite, inputs=[folder, *inputs])
    gguf = _gguf()
    config = ModelConfig.from_json_file(folder / "config.json")
    raw_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_pretrained(folder)
    planned = plan_tensors(folder, config, gguf_type)
    tokens, types, merges = token_table(tokenizer, config.vocab_size, str(folder))
    try:
        special = gguf.SpecialVocab(folder, load_merges=False)
    except (ValueError, OSError) as e:
        raise GGUFExportError(f"{folder}: the tokenizer's special tokens cannot be read ({e})") from None

    from tqdm import tqdm

    total = sum(t.entry.end - t.entry.begin for t in planned)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="gguf", disable=quiet, leave=False)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    for t in planned:
        writer.add_tensor(t.name, _Streamed(t, bar.update), raw_dtype=t.qtype)
    # The keys in the converter's order: general, the model's shape, the tokenizer.
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.resolve().name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if raw_config.get("head_dim") is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special.add_to_gguf(writer, quiet=True)  # bos/eos/pad ids, add_bos flags, chat template: as the converter
    try:
        with atomic_file(out_file, overwrite=overwrite, inputs=[folder, *inputs], **_RULE) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()  # flushed before atomic_file syncs and renames it
    finally:
        writer.close()
        bar.close()
    size = Path(out_file).stat().st_size
    return Summary(Path(out_file), gguf_type, len(planned), size, time.perf_counter() - start)
