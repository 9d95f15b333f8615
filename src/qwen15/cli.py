"""`qwen15 <command>`: one entry point; each command lives in qwen15.commands.<name> and is imported when used."""

from __future__ import annotations

import argparse
import importlib
import sys

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
    "data": ("qwen15.commands.data", "prepare datasets (alpaca-to-chat, preprocess)"),
    "train": ("qwen15.commands.train", "pretrain or finetune (one process or torchrun)"),
    "convert": ("qwen15.commands.convert", "convert training checkpoints to Hugging Face folders"),
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
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "_takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from qwen15.errors import UserError

    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"qwen15 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
