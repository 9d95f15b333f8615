"""`qwen15 eval ppl --model DIR --data FILE [--seq-length N --stride S]`: perplexity of a text file."""

from __future__ import annotations

import argparse

from qwen15.commands.options import add_model_arguments, bounded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "ppl",
        help="perplexity of a text file (sliding windows, as transformers' perplexity guide)",
        description="Perplexity of a UTF-8 text file, tokenized whole (no BOS/EOS added), with sliding windows of "
        "--seq-length tokens moved by --stride: each window scores only the tokens the previous one did not.",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument(
        "--seq-length", type=bounded(int, 2), default=1024, help="window length in tokens (default 1024)"
    )
    p.add_argument(
        "--stride", type=bounded(int, 1), default=512, help="tokens between window starts (default 512)"
    )
    p.add_argument(
        "--max-tokens", type=bounded(int, 2), help="score only the first N tokens of the file (at least 2)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from qwen15.commands.options import load_model
    from qwen15.paths import read_text_file
    from qwen15.perplexity import PerplexityError, perplexity

    if args.stride > args.seq_length:
        raise PerplexityError(f"--stride {args.stride} must not exceed --seq-length {args.seq_length}")
    text = read_text_file(args.data, "--data")
    model, tokenizer = load_model(args)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise PerplexityError(
            f"--data {args.data}: the text has {len(ids)} token(s); perplexity needs at least 2"
        )
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    result = perplexity(model, ids, seq_length=args.seq_length, stride=args.stride, progress=args.progress)
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"tokens: {len(ids)} in the text, {result.tokens_scored} scored in {result.windows} windows")
    print(f"mean negative log-likelihood: {result.mean_nll:.6f} nats/token")
    return 0
