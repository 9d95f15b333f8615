"""`qwen15 <command>`: one entry point; each command lives in qwen15.commands.<name> and is imported when used.

Errors: a `UserError` (bad input the user can fix) prints one line and exits 2; so does an operating-system error
about a user's path (a folder that cannot be written, a file where a folder was expected, a full disk). Anything
else is a bug: its traceback is printed with a line asking to report it (exit 1). `--debug` (or QWEN15_DEBUG=1)
prints the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int | None.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("qwen15.commands.tokenizer", "tokenizer tools (from-tiktoken, encode)"),
    "generate": ("qwen15.commands.generate", "continue prompts with a model (the seed's predict)"),
    "chat": ("qwen15.commands.chat", "multi-turn chat with a model"),
    "serve": (
        "qwen15.commands.serve",
        "an OpenAI-compatible server with continuous batching and a chat page",
    ),
    "eval": ("qwen15.commands.eval", "evaluate a model (perplexity)"),
    "data": ("qwen15.commands.data", "prepare datasets (alpaca-to-chat, preprocess, from-mindrecord)"),
    "train": ("qwen15.commands.train", "pretrain or finetune (one process or torchrun)"),
    "convert": (
        "qwen15.commands.convert",
        "training checkpoints to Hugging Face folders (a LoRA run's adapters to PEFT's format); MindSpore .ckpt "
        "in and out",
    ),
    "lora": ("qwen15.commands.lora", "LoRA adapters (merge into the base model)"),
    "demo": (
        "qwen15.commands.demo",
        "the quickstart: pretrain, finetune, export and chat with a small model on CPU",
    ),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> argparse.ArgumentParser:
    import importlib.util  # noqa: F401  (find_spec above)

    parser = argparse.ArgumentParser(
        prog="qwen15", description="PyTorch toolkit for the Qwen1.5 language models"
    )
    parser.add_argument("--version", action="version", version=f"qwen15 {__import__('qwen15').__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of every error (anywhere on the command line)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _takes_overrides=getattr(mod, "TAKES_OVERRIDES", False))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may come anywhere (after a subcommand's own subcommand too), so it is taken out before parsing
    debug = "--debug" in argv or os.environ.get("QWEN15_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "_takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return report_error(e, f"qwen15 {args.command}", debug)


def report_error(error: BaseException, prog: str, debug: bool = False) -> int:
    """Print `error` as the CLI does and return the exit code: 2 for the user's errors, 1 for bugs."""
    from qwen15.errors import UserError, describe_user_os_error

    message = str(error) if isinstance(error, UserError) else describe_user_os_error(error)
    if debug or message is None:
        traceback.print_exc()
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    print(
        f"{prog}: internal error ({type(error).__name__}). This is a bug in qwen15, not in your input: please "
        "report it with the command line and the traceback above.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
