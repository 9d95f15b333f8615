"""`qwen15 lora merge --model BASE --adapter DIR --output OUT`: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "merge",
        help="write a Hugging Face folder with the adapter folded into the base weights",
        description="W + scaling x B @ A for every adapted projection, computed in fp32 and cast once; config, "
        "generation config and tokenizer files of the base. The result loads in transformers, vLLM and qwen15 "
        "like any model (a tied model such as Qwen1.5-0.5B stays tied).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model's Hugging Face folder")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a LoRA adapter folder (PEFT format)")
    p.add_argument("--output", required=True, metavar="DIR", help="the merged model's folder")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weight dtype of the output (auto: the base's torch_dtype)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args: argparse.Namespace) -> int:
    from qwen15.lora.merge import merge_adapter_folder

    out = merge_adapter_folder(
        args.model,
        args.adapter,
        args.output,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0
