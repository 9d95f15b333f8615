"""`qwen15 eval ppl --model DIR --data FILE [--seq-length N --stride S]`: perplexity of a text file."""

from __future__ import annotations

import argparse

from qwen15.commands.options import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "ppl",
        help="perplexity of a text file (sliding windows, as transformers' perplexity guide)",
        description="Perplexity of a UTF-8 text file, tokenized whole (no BOS/EOS added), with sliding windows of "
        "--seq-length tokens moved by --stride: each window scores only the tokens the previous one did not.",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--seq-length", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen15.commands.options import load_model
    from qwen15.perplexity import PerplexityError, perplexity

    path = Path(args.data)
    if not path.is_file():
        raise PerplexityError(f"--data {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PerplexityError(f"--data {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    model, tokenizer = load_model(args)
    ids = tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    result = perplexity(model, ids, seq_length=args.seq_length, stride=args.stride, progress=args.progress)
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"tokens: {len(ids)} in the text, {result.tokens_scored} scored in {result.windows} windows")
    print(f"mean negative log-likelihood: {result.mean_nll:.6f} nats/token")
    return 0
