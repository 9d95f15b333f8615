"""`qwen15 convert --to hf CHECKPOINT OUTDIR`: a training checkpoint (any process count) -> Hugging Face folder.

`qwen15 convert --quantize int8|int4 SOURCE OUTDIR`: a Hugging Face folder (or a training checkpoint) -> a quantized
folder that generate/chat load without quantizing again (format: qwen15.quantize.saved).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", choices=["hf"], default="hf", help="output format (Hugging Face folder)")
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (step-XXXXXXXX), or a run / checkpoints directory (its latest complete one)",
    )
    parser.add_argument("out_dir", help="Hugging Face folder to write (config, safetensors, tokenizer files)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weight dtype (auto: the model's torch_dtype, bfloat16 for Qwen1.5)",
    )
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="export as a chat model")
    chat.add_argument("--base", dest="chat", action="store_false", help="export as a base model")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="write int8 or int4 weight-only weights instead (SOURCE: a Hugging Face folder or a checkpoint)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="int4 columns per scale (default 64)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from qwen15.train.export import export_hf

    if args.quantize:
        return _quantize(args)
    out = export_hf(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        chat=args.chat,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from qwen15.checkpoint import CheckpointError
    from qwen15.quantize.saved import quantize_folder
    from qwen15.train.export import export_hf

    source, out = Path(args.checkpoint), Path(args.out_dir)
    if not args.overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    hf = any((source / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    if hf:
        quantize_folder(source, out, args.quantize, group_size=args.group_size, overwrite=args.overwrite)
    else:  # a training checkpoint: through a Hugging Face folder beside the output, removed after
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".hf", dir=out.parent) as tmp:
            export_hf(args.checkpoint, Path(tmp) / "hf", dtype="bfloat16", chat=args.chat)
            quantize_folder(
                Path(tmp) / "hf", out, args.quantize, group_size=args.group_size, overwrite=args.overwrite
            )
    print(f"wrote {out} ({args.quantize})")
    return 0
