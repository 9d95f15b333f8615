"""MindFormers .ckpt (one file or per-rank folders) -> Hugging Face folder, and Hugging Face folder -> .ckpt.

Both stream: tensors are read and written a block of rows at a time. Nothing is written until the whole
checkpoint has been checked against the model config (names, shapes, fused layouts), and the output appears only
when complete (built beside the target, renamed at the end).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qwen15.atomic import check_output_file, check_output_folder
from qwen15.errors import UserError
from qwen15.hf_folder import OutTensor, write_hf_folder
from qwen15.mindspore import names as N
from qwen15.mindspore.ckpt import SLICE_BYTES, CkptFile, CkptWriter
from qwen15.mindspore.dtypes import FLOATS
from qwen15.mindspore.hf_source import read_hf_folder, read_safetensors
from qwen15.mindspore.plan import MigrationError, Summary, plan_from_mindformers, plan_to_mindformers
from qwen15.mindspore.source import row_blocks
from qwen15.mindspore.strategy import ShardedCheckpoint
from qwen15.model_config import ModelConfig


def _is_ckpt(path: Path) -> bool:
    """A file MindSpore's checkpoint reader takes (what --overwrite may replace)."""
    try:
        CkptFile(path, check_crc=False).close()
        return True
    except (UserError, OSError, ValueError):
        return False


class SafetensorsCheckpoint:
    """MindFormers weights that MindSpore saved with format="safetensors" (same names, one file)."""

    def __init__(self, path: Path):
        self.tensors = {t.name: t for t in read_safetensors(path)}
        self.strings: dict[str, str] = {}

    def close(self) -> None:
        pass


def open_mindspore(path: Path, strategy: Path | None):
    """A .ckpt or .safetensors file, or a folder of rank_N/ per-rank checkpoints (merged by their strategy)."""
    if path.suffix == ".safetensors" and path.is_file():
        return SafetensorsCheckpoint(path)
    if path.is_dir():
        if any(path.glob("rank_*")):
            return ShardedCheckpoint(
                path, strategy, merge=lambda name: not name.startswith(N.OPTIMIZER_PREFIXES)
            )
        files = sorted(path.glob("*.ckpt"))
        if len(files) != 1:
            raise MigrationError(
                f"{path}: expected one .ckpt file or rank_N/ folders, found "
                + (", ".join(p.name for p in files) if files else "neither")
            )
        path = files[0]
    return CkptFile(path)


class _Progress:
    def __init__(self, total: int, quiet: bool, desc: str):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, mininterval=0.5
            )

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def mindspore_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: ModelConfig,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    qkv_layout: str | None = None,
    strategy: str | Path | None = None,
    skip_lora: bool = False,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    quiet: bool = False,
) -> Summary:
    start = time.perf_counter()
    tok = Path(tokenizer) if tokenizer else None
    if tok is not None and not (tok / "vocab.json").is_file() and not (tok / "tokenizer.json").is_file():
        raise MigrationError(f"{tok}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    out = Path(out_dir)
    inputs = [checkpoint, strategy, tok]
    check_output_folder(out, overwrite=overwrite, inputs=inputs, flag="OUT_DIR")
    source = open_mindspore(Path(checkpoint), Path(strategy) if strategy else None)
    summary = Summary()
    try:
        parts = plan_from_mindformers(config, source.tensors, qkv_layout, skip_lora, summary, str(checkpoint))
        stored = source.tensors["model.tok_embeddings.embedding_weight"].dtype
        out_dtype = stored if dtype == "auto" else dtype
        if out_dtype not in FLOATS:
            raise MigrationError(
                f"{checkpoint}: the embedding is {stored}; pass --dtype (one of {', '.join(FLOATS)})"
            )
        tensors = []
        for p in parts:
            src = source.tensors[p.source]
            if src.dtype not in FLOATS:
                raise MigrationError(
                    f"{src.where}: tensor {p.source!r} is {src.dtype}, not a floating-point weight"
                )
            if src.dtype != out_dtype:
                summary.converted_dtype.append(src.dtype)
            tensors.append(
                OutTensor(p.hf_name, p.shape, out_dtype, lambda s=src, r=p.rows: row_blocks(s, r, out_dtype))
            )
        summary.mapped, summary.dtype = len(tensors), out_dtype
        summary.bytes = sum(t.nbytes for t in tensors)
        hf_config = config.replace(torch_dtype=out_dtype)
        progress = _Progress(summary.bytes, quiet, "convert")
        try:
            write_hf_folder(
                out,
                hf_config,
                tensors,
                tokenizer_dir=tok,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                inputs=inputs,
                on_bytes=progress,
            )
        finally:
            progress.close()
    finally:
        source.close()
    summary.seconds = time.perf_counter() - start
    return summary


def hf_to_mindspore(
    hf_dir: str | Path,
    out_file: str | Path,
    *,
    dtype: str = "auto",
    qkv_layout: str | None = None,
    crc: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    slice_bytes: int | None = None,
) -> Summary:
    """The seed's convert_weight.py direction: names renamed, optionally fused, in transformers' order."""
    start = time.perf_counter()
    folder, out = Path(hf_dir), Path(out_file)
    if not folder.is_dir():
        raise MigrationError(f"{folder}: no such Hugging Face folder")
    check_output_file(
        out, overwrite=overwrite, inputs=[folder], flag="OUT", looks_ours=_is_ckpt, what="MindSpore .ckpt"
    )
    cfg = ModelConfig.from_json_file(folder / "config.json")
    found = {t.name: t for t in read_hf_folder(folder)}
    summary = Summary()
    records = plan_to_mindformers(cfg, found, dtype, qkv_layout, summary, str(folder))
    total = sum(r.nbytes for r in records)
    progress = _Progress(total, quiet, "convert")
    try:
        with CkptWriter(out, crc=crc, slice_bytes=slice_bytes or SLICE_BYTES) as writer:
            for r in records:

                def counted(r=r):
                    for block in r.blocks():
                        progress(block.nbytes)
                        yield block

                writer.add(r.name, r.dtype, r.shape, counted())
    finally:
        progress.close()
    summary.bytes = total
    summary.seconds = time.perf_counter() - start
    return summary
