"""`qwen15 data alpaca-to-chat`, `preprocess`, `inspect` (docs/data.md) and `from-mindrecord` (docs/migrate.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen15.commands.options import bounded, utf8_text
from qwen15.data.inputs import MAX_SEQ_LENGTH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "alpaca-to-chat",
        help="convert Alpaca records to JSON Lines conversations (the seed's converter)",
        description="Alpaca JSON (or JSON Lines) -> JSON Lines of {'type': 'chatml', 'messages': [...]}: system "
        "turn, any 'history' turns, then user (instruction, or instruction without one trailing '.' + ': ' + "
        "input) and assistant (output).",
    )
    p.add_argument("--input", "--data_path", nargs="+", required=True, help="Alpaca files (paths or globs)")
    p.add_argument("--output", "--output_path", required=True, help="the JSON Lines file to write")
    p.add_argument(
        "--system-prompt",
        default=None,
        type=utf8_text("--system-prompt"),
        help="system turn (default: 'You are a helpful assistant.')",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and report how many")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser(
        "preprocess",
        help="tokenize wiki, text or chat data into training rows",
        description="Tokenize text or conversations into a dataset folder of rows of seq_length + 1 tokens "
        "(meta.json, tokens.npy, loss_mask.npy, doc_ids.npy for packed rows). See docs/data.md.",
    )
    p.add_argument(
        "--type",
        "--dataset_type",
        required=True,
        choices=("wiki", "text", "chat", "qa"),
        help="wiki: WikiText with the seed's cleaning; text: plain text; chat (or the seed's 'qa'): conversations",
    )
    p.add_argument("--input", "--input_glob", nargs="+", required=True, help="input files (paths or globs)")
    p.add_argument("--tokenizer", help="tokenizer folder (vocab.json + merges.txt or tokenizer.json)")
    p.add_argument("--vocab-file", "--vocab_file", help="vocab.json (with --merges-file, like the seed)")
    p.add_argument("--merges-file", "--merges_file", help="merges.txt (with --vocab-file)")
    p.add_argument(
        "--seq-length",
        "--seq_length",
        type=bounded(int, 1, MAX_SEQ_LENGTH),
        required=True,
        help="rows hold seq_length + 1 tokens",
    )
    p.add_argument("--output", required=True, help="dataset folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--workers", type=bounded(int, 1), default=1, help="tokenizer processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("wiki and text")
    g.add_argument(
        "--doc-separator",
        choices=("none", "eos"),
        default=None,
        help="put <|endoftext|> between documents (articles, files, blocks); default: none for wiki (the seed), "
        "eos for text",
    )
    g.add_argument(
        "--text-unit",
        choices=("file", "block"),
        default="file",
        help="text: a document is a whole file (default) or a block between blank lines",
    )
    g = p.add_argument_group("chat")
    g.add_argument(
        "--loss-on",
        choices=("assistant", "all"),
        default="assistant",
        help="assistant: only assistant replies and their <|im_end|> carry loss (default); all: every token "
        "(the seed)",
    )
    g.add_argument(
        "--layout",
        choices=("pad", "pack"),
        default="pad",
        help="pad: one conversation per row, right-padded (the seed, default); pack: whole conversations packed "
        "into rows with their boundaries recorded",
    )
    g.add_argument(
        "--overlong",
        choices=("truncate", "drop"),
        default="truncate",
        help="conversations longer than seq_length + 1 tokens: truncate (default, the seed) or drop",
    )
    g.add_argument(
        "--system-prompt",
        default=None,
        type=utf8_text("--system-prompt"),
        help="system turn for Alpaca records (default 'You are a helpful assistant.') and for conversations "
        "without one (default: the chat template's)",
    )
    g.add_argument("--skip-bad", action="store_true", help="skip bad records and report how many")

    p = sub.add_parser(
        "from-mindrecord",
        help="a MindRecord data set of the seed's preprocessing -> dataset folder",
        description="Rows of a MindRecord file (input_ids; or input_ids, target_ids, attention_mask) written by "
        "the seed's qwen1_5_preprocess.py -> a dataset folder, ids kept exactly. See docs/migrate.md.",
    )
    p.add_argument("file", help="the .mindrecord file (or the first shard, NAME0); its .db index beside it")
    p.add_argument("output", help="dataset folder to create")
    p.add_argument("--tokenizer", help="tokenizer folder the data was made with (recorded in meta.json)")
    p.add_argument("--vocab-file", "--vocab_file", help="vocab.json (with --merges-file, like the seed)")
    p.add_argument("--merges-file", "--merges_file", help="merges.txt (with --vocab-file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("inspect", help="show a dataset folder's meta.json and decode some rows")
    p.add_argument("folder")
    p.add_argument("--rows", type=bounded(int, 0), nargs="*", default=[0], help="rows to show (default: 0)")
    p.add_argument("--tokenizer", help="tokenizer folder, to decode the rows")
    p.add_argument(
        "--chars", type=bounded(int, 1), default=600, help="characters of each row to print (default 600)"
    )


def _tokenizer(args: argparse.Namespace):
    from qwen15.data.inputs import DataInputError
    from qwen15.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.from_pretrained(args.tokenizer)
    if args.vocab_file and args.merges_file:
        return Tokenizer.from_files(args.vocab_file, args.merges_file)
    raise DataInputError(
        "name the tokenizer: --tokenizer DIR, or --vocab-file vocab.json --merges-file merges.txt"
    )


def _command(args: argparse.Namespace) -> list[str]:
    return ["qwen15", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("qwen15") else []


def run(args: argparse.Namespace) -> int:
    return {
        "alpaca-to-chat": _alpaca_to_chat,
        "preprocess": _preprocess,
        "inspect": _inspect,
        "from-mindrecord": _from_mindrecord,
    }[args.data_command](args)


def _from_mindrecord(args: argparse.Namespace) -> int:
    from qwen15.data.writer import check_output
    from qwen15.mindspore.mindrecord import MindRecord
    from qwen15.mindspore.records_to_dataset import mindrecord_to_dataset

    check_output(args.output, args.overwrite)
    MindRecord(args.file)  # a bad file is refused before the tokenizer loads
    meta = mindrecord_to_dataset(
        args.file,
        args.output,
        _tokenizer(args),
        overwrite=args.overwrite,
        command=_command(args),
        quiet=args.quiet,
    )
    print(
        f"wrote {args.output}: {meta['rows']:,} rows of {meta['seq_length'] + 1:,} tokens ({meta['type']}, layout "
        f"{meta['layout']}, fields {', '.join(meta['mindrecord_fields'])}); {meta['loss_tokens']:,} targets, "
        f"{meta['padding_tokens']:,} padding; {meta['seconds']:.1f} s"
    )
    return 0


def _alpaca_to_chat(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen15.data.inputs import expand_inputs
    from qwen15.data.records import alpaca_to_chat

    result = alpaca_to_chat(
        expand_inputs(args.input),
        Path(args.output),
        system_prompt=args.system_prompt,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
    )
    print(f"wrote {result['written']} conversations to {args.output} ({result['records']} records read)")
    _print_skipped(result["skipped"])
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from qwen15.data.inputs import expand_inputs
    from qwen15.data.writer import check_output

    used = [*expand_inputs(args.input), args.tokenizer, args.vocab_file, args.merges_file]
    check_output(args.output, args.overwrite, used)  # before the tokenizer loads
    tok = _tokenizer(args)
    common = dict(
        seq_length=args.seq_length,
        workers=args.workers,
        overwrite=args.overwrite,
        command=_command(args),
        quiet=args.quiet,
    )
    if args.type in ("wiki", "text"):
        from qwen15.data.pretrain import preprocess_text

        meta = preprocess_text(
            args.input,
            args.output,
            tok,
            kind=args.type,
            doc_separator=args.doc_separator,
            text_unit=args.text_unit,
            **common,
        )
    else:
        from qwen15.data.sft import preprocess_chat

        meta = preprocess_chat(
            args.input,
            args.output,
            tok,
            layout=args.layout,
            loss_on=args.loss_on,
            overlong=args.overlong,
            system_prompt=args.system_prompt,
            skip_bad=args.skip_bad,
            **common,
        )
    _print_summary(args.output, meta)
    return 0


def _print_summary(output: str, meta: dict[str, Any]) -> None:
    row_len = meta["seq_length"] + 1
    print(
        f"wrote {output}: {meta['rows']:,} rows of {row_len:,} tokens ({meta['type']}, layout {meta['layout']}, "
        f"loss on {meta['loss_on']}); {meta['tokens']:,} tokens, {meta['padding_tokens']:,} padding, "
        f"{meta['loss_tokens']:,} targets; {meta['seconds']:.1f} s, {meta['tokens_per_second']:,} tokens/s"
    )
    if meta["type"] == "chat":
        print(f"  {meta['conversations']:,} conversations, rows {meta['fill']:.1%} full")
        if meta["truncated"]:
            print(f"  truncated to {row_len} tokens: {meta['truncated']:,} conversations")
        if meta["dropped_overlong"]:
            print(f"  dropped as longer than {row_len} tokens: {meta['dropped_overlong']:,} conversations")
        if meta["no_loss_conversations"]:
            print(
                f"  without any target token (e.g. truncated before the reply): {meta['no_loss_conversations']:,}"
            )
        _print_skipped(meta["skipped"])
    else:
        if meta["dropped_tail_tokens"]:
            print(f"  dropped: the last partial row ({meta['dropped_tail_tokens']:,} tokens)")
        if meta["separator_tokens"]:
            print(f"  <|endoftext|> between documents: {meta['separator_tokens']:,}")


def _print_skipped(skipped: dict[str, Any]) -> None:
    if not skipped["count"]:
        return
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(skipped["kinds"].items()))
    print(f"  skipped {skipped['count']:,} bad records ({kinds}); first ones:")
    for line in skipped["examples"][:5]:
        print(f"    {line}")


def _inspect(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from qwen15.data.dataset import TokenDataset

    ds = TokenDataset(args.folder)
    from qwen15.data.inputs import DataInputError

    outside = [r for r in args.rows if r >= len(ds)]
    if outside:
        raise DataInputError(f"--rows {outside[0]}: {args.folder} has {len(ds)} rows (0..{len(ds) - 1})")
    meta = {k: v for k, v in ds.meta.items() if k not in ("sources", "command")}
    print(json.dumps(meta, indent=2, ensure_ascii=False))
    for s in ds.meta.get("sources", []):
        print(f"source: {s['path']} ({s['bytes']:,} bytes, sha256 {s['sha256'][:16]}...)")
    tok = None
    if args.tokenizer:
        tok = _tokenizer(argparse.Namespace(tokenizer=args.tokenizer, vocab_file=None, merges_file=None))
    for r in args.rows:
        row = ds[r]
        tokens, mask = np.asarray(row["tokens"]), np.asarray(row["loss_mask"])
        print(f"--- row {r}: {int(mask[1:].sum())} targets of {len(tokens) - 1}")
        if tok is None:
            print(tokens[:32].tolist(), "...")
            continue
        # Target spans are shown between [[ ]] so that the loss mask can be checked by eye.
        bounds = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
        out = []
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(tokens)]):
            text = tok.decode(tokens[a:b].tolist())
            out.append(f"[[{text}]]" if mask[a] else text)
        print("".join(out)[: args.chars])
    return 0
