"""`qwen15 generate --model DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts (the seed's predict).

Raw continuation, no chat template; several prompts run as one batch.
"""

from __future__ import annotations

import argparse
import sys

from qwen15.commands.options import (
    SAMPLING_HELP,
    add_draft_arguments,
    add_model_arguments,
    add_sampling_arguments,
    load_draft,
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
    add_draft_arguments(parser)
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
    if args.draft_model and len(args.prompt) != 1:
        raise UserError("--draft-model takes one --prompt (speculative decoding runs one sequence at a time)")
    model, tokenizer = load_model(args)
    draft = load_draft(args, model, tokenizer)
    if draft is not None:
        return _speculative(args, model, draft, tokenizer, sampling)
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


def _speculative(args: argparse.Namespace, model, draft, tokenizer, sampling: dict) -> int:
    import time

    from qwen15.speculative import speculative_stream

    t = time.perf_counter()
    stream = speculative_stream(
        model,
        draft,
        tokenizer,
        args.prompt[0],
        k=args.draft_tokens,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        seed=args.seed,
        **sampling,
    )
    if args.stream:
        print(args.prompt[0], end="", flush=True)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
    else:
        print(args.prompt[0] + "".join(stream))
    dt = time.perf_counter() - t
    c = stream.completion
    print(
        f"[{c.finish_reason}, {len(c.token_ids)} new tokens in {dt:.2f}s, {len(c.token_ids) / dt:.1f} tokens/s; "
        f"draft tokens accepted {c.accepted}/{c.proposed} ({100 * c.acceptance_rate:.0f}%), "
        f"{c.target_forwards} forward passes of the model]",
        file=sys.stderr,
    )
    return 0
