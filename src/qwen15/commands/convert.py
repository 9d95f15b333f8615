"""`qwen15 convert --to hf CHECKPOINT OUTDIR`: a training checkpoint (any process count) -> Hugging Face folder;
`--to peft`: the adapters of a LoRA run -> PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        choices=["hf", "peft"],
        default="hf",
        help="output format: hf (Hugging Face model folder) or peft (the adapters of a LoRA run)",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (step-XXXXXXXX), or a run / checkpoints directory (its latest complete one)",
    )
    parser.add_argument(
        "out_dir", help="folder to write (hf: config, safetensors, tokenizer files; peft: adapter)"
    )
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
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from qwen15.train.export import export_hf, export_peft

    if args.to == "peft":
        print(f"wrote {export_peft(args.checkpoint, args.out_dir, overwrite=args.overwrite)}")
        return 0

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
