"""`qwen15 generate --model DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts (the seed's predict).

Raw continuation, no chat template; several prompts run as one batch.
"""

from __future__ import annotations

import argparse
import sys

from qwen15.commands.options import (
    SAMPLING_HELP,
    add_model_arguments,
    add_sampling_arguments,
    load_model,
    sampling_overrides,
    utf8_text,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        type=utf8_text("--prompt"),
        help="text to continue (repeatable: one batch)",
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=128)
    parser.add_argument(
        "--stream", action="store_true", help="print text as it is generated (one prompt only)"
    )
    parser.epilog = SAMPLING_HELP


def run(args: argparse.Namespace) -> int:
    import time

    from qwen15.errors import UserError
    from qwen15.generation import generate, stream_generate

    sampling = sampling_overrides(args)
    empty = [i + 1 for i, text in enumerate(args.prompt) if not text]
    if empty:
        raise UserError(f"--prompt number {empty[0]} is empty; give some text to continue")
    if args.stream and len(args.prompt) != 1:
        raise UserError("--stream takes one --prompt")
    model, tokenizer = load_model(args)
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        seed=args.seed,
        compile=args.compile,
        **sampling,
    )
    if args.stream:
        print(args.prompt[0], end="", flush=True)
        stream = stream_generate(model, tokenizer, args.prompt[0], **kw)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        print(
            f"[{stream.completion.finish_reason}, {len(stream.completion.token_ids)} tokens]", file=sys.stderr
        )
        return 0
    t = time.perf_counter()
    outs = generate(model, tokenizer, list(args.prompt), **kw)
    dt = time.perf_counter() - t
    for i, (prompt, out) in enumerate(zip(args.prompt, outs)):
        if len(outs) > 1:
            print(f"--- prompt {i + 1} ({out.finish_reason}, {len(out.token_ids)} tokens)")
        print(prompt + out.text)
    total = sum(len(o.token_ids) for o in outs)
    print(f"[{total} new tokens in {dt:.2f}s, {total / dt:.1f} tokens/s]", file=sys.stderr)
    return 0
