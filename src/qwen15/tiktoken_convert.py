"""A Qwen tiktoken rank file -> vocab.json + merges.txt, byte-identical to the files Qwen checkpoints ship.

Each token of rank r is the merge of the two parts that byte-level BPE, using only ranks below r, leaves of it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from qwen15.atomic import atomic_directory, atomic_write_text, check_output_folder
from qwen15.tokenizer import TokenizerError, bytes_to_unicode


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    """token bytes -> rank; a TokenizerError naming the file (and line) for anything but a complete rank file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise TokenizerError(f"{path}: {what}; pass a tiktoken rank file (e.g. qwen.tiktoken)")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, base64.binascii.Error):
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
    if not ranks:
        raise TokenizerError(f"{path}: no tokens (an empty rank file); pass a tiktoken rank file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not the numbers 0..{len(ranks) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: {len(missing)} of the 256 single bytes have no rank (e.g. byte {missing[0]}); a byte-level "
            "BPE rank file lists every byte"
        )
    return ranks


def _split_below(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def rank_file_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    to_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split_below(token, ranks, rank)
        if len(parts) != 2:
            raise TokenizerError(
                f"token of rank {rank} ({token!r}) is not the merge of two lower-ranked tokens"
            )
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    return vocab, merges


def convert(
    rank_file: str | Path, out_dir: str | Path, *, overwrite: bool = False, flag: str = "OUT_DIR"
) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt into the folder `out_dir` (the output rule of qwen15.atomic)."""
    rule = dict(overwrite=overwrite, inputs=[rank_file], flag=flag)
    check_output_folder(out_dir, **rule)  # before the work
    vocab, merges = rank_file_to_vocab_merges(read_rank_file(rank_file))
    with atomic_directory(out_dir, **rule, kind="tokenizer") as tmp:
        atomic_write_text(tmp / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
        atomic_write_text(tmp / "merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    out = Path(out_dir)
    return out / "vocab.json", out / "merges.txt"
