"""Hugging Face model folders as files: safetensors headers and row reads, the index, generation_config.json,
tokenizer files, and the one writer of such folders. numpy only (no torch), so that a conversion between formats
need not load torch; putting the weights into a model is qwen15.hf_checkpoint's job.

The writer streams: each safetensors file gets its header from the tensors' shapes first, then each tensor's
bytes as its `blocks()` produce them, so writing holds one block in memory, never a shard or the model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen15.atomic import atomic_directory, atomic_write_text
from qwen15.errors import UserError
from qwen15.model_config import CHAT_SAMPLING, ENDOFTEXT_ID, IM_END_ID, IM_START_ID, ModelConfig

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# dtype name -> (numpy dtype of the stored bytes, safetensors code); bfloat16 is held as its uint16 bits
DTYPES: dict[str, tuple[Any, str]] = {
    "float64": (np.float64, "F64"),
    "float32": (np.float32, "F32"),
    "float16": (np.float16, "F16"),
    "bfloat16": (np.uint16, "BF16"),
    "int64": (np.int64, "I64"),
    "int32": (np.int32, "I32"),
    "int16": (np.int16, "I16"),
    "int8": (np.int8, "I8"),
    "uint64": (np.uint64, "U64"),
    "uint32": (np.uint32, "U32"),
    "uint16": (np.uint16, "U16"),
    "uint8": (np.uint8, "U8"),
    "bool": (np.bool_, "BOOL"),
}
FROM_SAFETENSORS = {code: name for name, (_, code) in DTYPES.items()}


class CheckpointError(UserError):
    """A checkpoint that does not fit the model; the message names the file and the tensors concerned."""


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face name."""
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def itemsize(dtype: str) -> int:
    return np.dtype(DTYPES[dtype][0]).itemsize


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class TensorEntry:
    """One tensor of a safetensors file: dtype name, shape and absolute byte offsets of its data."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 (along dim 0) in the stored dtype, read from the file."""
        rows = self.shape[0] if self.shape else 1
        row_bytes = (self.end - self.begin) // max(rows, 1)
        out = np.empty((r1 - r0, *self.shape[1:]), DTYPES[self.dtype][0])
        with open(self.file, "rb") as f:
            f.seek(self.begin + r0 * row_bytes)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise CheckpointError(f"{self.file}: tensor data is cut off (truncated file?)")
        return out


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(raw, "little")
            if n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (named by the checkpoint index)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    size = path.stat().st_size
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = spec["data_offsets"]
            code, shape = spec["dtype"], tuple(spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        if code not in FROM_SAFETENSORS:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code}, which is not supported")
        entry = TensorEntry(path, FROM_SAFETENSORS[code], shape, 8 + n + begin, 8 + n + end)
        if entry.end > size or entry.end - entry.begin != math.prod(shape) * itemsize(entry.dtype):
            raise CheckpointError(
                f"{path}: tensor {name!r} runs past the end of the file (truncated download?)"
            )
        entries[name] = entry
    return entries


def weight_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the folder's safetensors files (indexed, single or loose), by Hugging Face name."""
    if (folder / SAFE_INDEX).exists():
        weight_map = read_json(folder / SAFE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / SAFE_INDEX}: 'weight_map' is missing or empty")
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / SAFE_SINGLE).exists():
        files = [folder / SAFE_SINGLE]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise CheckpointError(
                f"{folder}: holds {pickled[0]} (PyTorch pickle) but no safetensors; qwen15 never unpickles weight "
                'files. Convert once where transformers is installed: python -c "from transformers import '
                f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\""
            )
        raise CheckpointError(f"{folder}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")
    entries: dict[str, TensorEntry] = {}
    for f in files:
        entries.update(read_safetensors_header(f))
    return entries


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); is it a JSON file?") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_generation_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "generation_config.json"
    return read_json(path) if path.is_file() else None


def check_names(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    tied: bool,
    where: str,
    *,
    subject: str = "the weights do not match config.json",
    hint: str = "Check that config.json belongs to these weights (a q/k/v bias or lm_head dropped by a "
    "converter shows up here)",
) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming them (a tied model accepts a redundant lm_head;
    `subject` and `hint` frame the message)."""
    found = {k: v for k, v in found.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied and "lm_head.weight" in found and "model.embed_tokens.weight" in expected:
        expected = dict(expected, **{"lm_head.weight": expected["model.embed_tokens.weight"]})
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {list(found[k])}, model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_abbrev(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_abbrev(unexpected))}")
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(_abbrev(shapes))}")
    if problems:
        raise CheckpointError(f"{where}: {subject} — " + " | ".join(problems) + f". {hint}.")


def _abbrev(items: list[str], n: int = 8) -> list[str]:
    return items if len(items) <= n else items[:n] + [f"... ({len(items) - n} more)"]


# ---------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes of '5GB', '500MB', '2GiB' or a plain number; a CheckpointError naming the value otherwise."""
    if isinstance(size, int) and size >= 1:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    value = float(m.group(1)) * powers[m.group(2) or "B"] if m else 0.0
    if not 1 <= value <= 2**60:
        raise CheckpointError(
            f"--max-shard-size {size!r}: not a size between 1 byte and 1 EiB; write e.g. '5GB' or '500MB'"
        )
    return int(value)


def saved_special_ids(folder: Path) -> dict[str, int]:
    """Special token -> id of the tokenizer saved in `folder` (tokenizer_config.json, else tokenizer.json); empty
    when the folder holds no tokenizer."""
    cfg_file, tok_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    try:
        if cfg_file.is_file():
            decoder = json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            return {spec["content"]: int(i) for i, spec in decoder.items() if spec.get("special", True)}
        if tok_file.is_file():
            added = json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens") or []
            return {t["content"]: int(t["id"]) for t in added if t.get("special")}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{folder}: the tokenizer's special tokens cannot be read") from None
    return {}


def _fit_ids(value: Any, qwen_ids: dict[int, str], specials: dict[str, int], vocab: int) -> Any:
    """An id (or list of ids) of a config written for Qwen's numbering, in the saved tokenizer's numbering: a
    Qwen special id becomes the saved tokenizer's id of that token; ids outside the vocabulary are dropped."""
    if isinstance(value, list):
        out = [i for i in (_fit_ids(v, qwen_ids, specials, vocab) for v in value) if i is not None]
        return out or None
    if not isinstance(value, int):
        return value
    if value in specials.values():
        return value
    name = qwen_ids.get(value)
    if name is not None and name in specials:
        return specials[name]
    return value if 0 <= value < vocab else None


def fit_to_tokenizer(
    config: ModelConfig, generation: dict[str, Any] | None, specials: dict[str, int]
) -> tuple[ModelConfig, dict[str, Any] | None]:
    """config.json and generation_config.json as they must be beside the tokenizer saved with them: special-token
    ids from that tokenizer (a model of a small vocabulary must not name Qwen's 151643), and a max_new_tokens
    within the model's context. Without a saved tokenizer (`specials` empty) both are left as they are."""
    if not specials:  # no tokenizer saved beside them: nothing to take the ids from
        return config, generation
    qwen_ids = {ENDOFTEXT_ID: "<|endoftext|>", IM_START_ID: "<|im_start|>", IM_END_ID: "<|im_end|>"}
    vocab = config.vocab_size
    config = config.replace(
        bos_token_id=_fit_ids(config.bos_token_id, qwen_ids, specials, vocab),
        eos_token_id=_fit_ids(config.eos_token_id, qwen_ids, specials, vocab),
    )
    if generation is not None:
        generation = dict(generation)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if key in generation:
                fitted = _fit_ids(generation[key], qwen_ids, specials, vocab)
                if fitted is None:
                    del generation[key]
                else:
                    generation[key] = fitted
        limit = config.max_position_embeddings
        if isinstance(generation.get("max_new_tokens"), int) and generation["max_new_tokens"] > limit:
            generation["max_new_tokens"] = limit
    return config, generation


def generation_config(
    chat: bool, endoftext_id: int, im_end_id: int, sampling: dict[str, Any] | None = None
) -> dict[str, Any]:
    """generation_config.json as Qwen1.5 ships it: chat models stop on <|im_end|> and <|endoftext|> and sample
    (`sampling` overrides CHAT_SAMPLING and may add do_sample / max_new_tokens); base models stop on
    <|endoftext|> and decode greedily."""
    if not chat:
        return {"bos_token_id": endoftext_id, "eos_token_id": endoftext_id, "do_sample": False}
    return {
        "bos_token_id": endoftext_id,
        "pad_token_id": endoftext_id,
        "eos_token_id": [im_end_id, endoftext_id],
        "do_sample": True,
        **CHAT_SAMPLING,
        **(sampling or {}),
    }


def default_generation_config(config: ModelConfig) -> dict[str, Any]:
    """A chat model (eos <|im_end|>) samples with the chat defaults; others decode greedily."""
    return generation_config(IM_END_ID in config.eos_token_ids, ENDOFTEXT_ID, IM_END_ID)


@dataclass
class OutTensor:
    """A tensor to write: its name, shape, dtype name and a function giving its data as row blocks (numpy
    arrays in the stored dtype, in order)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    blocks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def plan_shards(tensors: list[OutTensor], max_shard_size: int | str) -> list[list[OutTensor]]:
    """The tensors of each output file, in order: a new file starts where the next tensor would pass the limit."""
    limit = parse_size(max_shard_size)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(path: Path, tensors: list[OutTensor], on_bytes: Callable[[int], None] = lambda n: None):
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPES[t.dtype][1],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors:
            written = 0
            for block in t.blocks():
                data = np.ascontiguousarray(block, DTYPES[t.dtype][0]).reshape(-1).view(np.uint8)
                f.write(data)
                written += data.nbytes
                on_bytes(data.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")


def write_hf_folder(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: list[OutTensor],
    *,
    generation: dict[str, Any] | None = None,
    tokenizer=None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "OUT_DIR",
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Path:
    """Write a Hugging Face folder by the output rule of qwen15.atomic (built beside `path`, renamed when
    complete; an existing folder replaced only with overwrite and only one qwen15 wrote; never one of `inputs`
    or a folder holding them): the tensors (under Hugging Face names) in safetensors files of at most
    max_shard_size with an index when there are several, config.json, generation_config.json (`generation`, else
    the default for the config), and the tokenizer files from `tokenizer` (a qwen15 Tokenizer) or copied from
    `tokenizer_dir`; the special-token ids of both configs are then that tokenizer's (fit_to_tokenizer)."""
    shards = plan_shards(tensors, max_shard_size)
    sources = [*inputs, tokenizer_dir, getattr(tokenizer, "source", None)]
    with atomic_directory(path, overwrite=overwrite, inputs=sources, flag=flag, kind="hf-model") as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        gen = generation if generation is not None else default_generation_config(config)
        config, gen = fit_to_tokenizer(config, gen, saved_special_ids(tmp))
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / fname, shard, on_bytes)
            weight_map.update(dict.fromkeys((t.name for t in shard), fname))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
            atomic_write_text(tmp / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
        config.save_json(tmp / "config.json")
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return Path(path)
