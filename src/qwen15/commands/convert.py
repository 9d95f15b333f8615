"""`qwen15 convert --to hf CHECKPOINT OUTDIR`: a training checkpoint (any process count) -> Hugging Face folder;
`--to peft`: the adapters of a LoRA run -> PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
`--from mindspore CKPT_OR_DIR OUTDIR` and `--to mindspore HF_DIR OUT.ckpt`: MindSpore/MindFormers checkpoints;
`--from mindspore --to peft`: MindFormers LoRA weights -> PEFT adapter folder (docs/migrate.md);
`--quantize int8|int4 SOURCE OUTDIR`: a Hugging Face folder (or a training checkpoint) -> a quantized folder that
generate/chat load without quantizing again (format: qwen15.quantize.saved);
`--to gguf SOURCE OUT.gguf --gguf-type f32|f16|bf16|q8_0|q4_0`: the same sources -> one GGUF file for llama.cpp
(qwen15.gguf_export)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        choices=["hf", "peft", "mindspore", "gguf"],
        default="hf",
        help="output format: hf (Hugging Face model folder, the default), peft (the adapters of a LoRA run), "
        "mindspore (a MindFormers .ckpt) or gguf (one file for llama.cpp; SOURCE a Hugging Face folder or a "
        "checkpoint)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        choices=["qwen15", "mindspore"],
        default="qwen15",
        help="input format (default: a qwen15 training checkpoint)",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (step-XXXXXXXX), or a run / checkpoints directory (its latest complete one); "
        "with --from mindspore a .ckpt file or a folder of rank_N/ folders; with --to mindspore a Hugging Face "
        "folder",
    )
    parser.add_argument(
        "out_dir",
        help="folder to write (hf: config, safetensors, tokenizer files; peft: adapter), or OUT.ckpt",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weight dtype (auto: the model's torch_dtype; with MindSpore files, the stored dtype)",
    )
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="export as a chat model")
    chat.add_argument("--base", dest="chat", action="store_false", help="export as a base model")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="write int8 or int4 weight-only weights instead (SOURCE: a Hugging Face folder or a checkpoint)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="int4 columns per scale (default 64)",
    )
    parser.add_argument(
        "--gguf-type",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
        help="--to gguf: the matrices' type (default f16, as llama.cpp's converter; norms and biases stay f32)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it exists (only a folder qwen15 wrote)"
    )
    ms = parser.add_argument_group("MindSpore / MindFormers (docs/migrate.md)")
    ms.add_argument(
        "--config",
        help="--from mindspore: model shapes, a MindFormers YAML (model.model_config) or a config.json; "
        "with --to peft the YAML of the LoRA run (its model_config.pet_config)",
    )
    ms.add_argument("--tokenizer", help="--from mindspore: tokenizer folder to copy into the output")
    ms.add_argument(
        "--qkv-layout",
        choices=["concat", "interleaved"],
        help="row order of fused w_qkv / w_gate_hidden: concat (MindFormers <= 1.3) or interleaved (>= 1.4); "
        "--from: required when a fused checkpoint is ambiguous; --to: write fused tensors (default: unfused)",
    )
    ms.add_argument("--strategy", help="--from mindspore: strategy file or folder of per-rank checkpoints")
    ms.add_argument(
        "--skip-lora", action="store_true", help="--from mindspore: convert base weights, drop LoRA"
    )
    ms.add_argument(
        "--crc", action="store_true", help="--to mindspore: append a CRC (save_checkpoint crc_check)"
    )
    ms.add_argument("--quiet", action="store_true", help="no progress bar")


_ONLY = {  # option -> the directions it belongs to
    "config": ("from",),
    "tokenizer": ("from",),
    "strategy": ("from",),
    "skip_lora": ("from",),
    "crc": ("to",),
    "qkv_layout": ("from", "to"),
}


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that the chosen direction would ignore."""
    from qwen15.errors import UserError

    direction = "from" if args.source == "mindspore" else "to" if args.to == "mindspore" else None
    for name, allowed in _ONLY.items():
        if getattr(args, name) not in (None, False) and direction not in allowed:
            where = " or ".join(f"--{d} mindspore" for d in allowed)
            raise UserError(f"--{name.replace('_', '-')} applies to {where} only")
    if args.source == "mindspore" and args.to == "peft":
        for name, why in (
            ("skip_lora", "drops the LoRA weights, which are all --to peft converts"),
            ("tokenizer", "goes into a model folder; an adapter folder has none"),
        ):
            if getattr(args, name) not in (None, False):
                raise UserError(f"--{name.replace('_', '-')} {why} (--from mindspore --to peft)")
        if args.chat is not None:
            raise UserError("--chat/--base do not apply to --to peft (an adapter has no generation config)")
    if args.quantize and (args.to != "hf" or args.source != "qwen15"):
        raise UserError("--quantize writes a qwen15 quantized folder; it does not combine with --to/--from")
    if args.gguf_type and args.to != "gguf":
        raise UserError("--gguf-type applies to --to gguf only")
    if args.to == "gguf":
        if args.source != "qwen15":
            raise UserError(
                "--to gguf reads a Hugging Face folder or a qwen15 checkpoint; convert --from mindspore to a "
                "Hugging Face folder first"
            )
        if args.dtype != "auto":
            raise UserError("--dtype does not apply to --to gguf; --gguf-type sets the type written")
    if args.group_size and args.quantize != "int4":
        raise UserError("--group-size applies to --quantize int4 only")
    if direction == "to" and args.chat is not None:
        raise UserError("--chat/--base do not apply to --to mindspore (a .ckpt holds weights only)")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    if args.quantize or args.group_size:
        return _quantize(args)
    if args.source == "mindspore" or args.to == "mindspore":
        return _mindspore(args)
    if args.to == "gguf":
        return _gguf(args)
    import sys

    from qwen15.train.export import export_hf, export_peft

    if args.to == "peft":
        warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
        print(f"wrote {export_peft(args.checkpoint, args.out_dir, overwrite=args.overwrite, warn=warn)}")
        return 0

    out = export_hf(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        chat=args.chat,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        warn=lambda m: print(m, file=sys.stderr),
    )
    print(f"wrote {out}")
    return 0


def _mindspore(args: argparse.Namespace) -> int:
    from qwen15.errors import UserError
    from qwen15.mindspore.convert import hf_to_mindspore, mindspore_to_hf

    if args.source == "mindspore" and args.to == "mindspore":
        raise UserError("--from mindspore and --to mindspore together: nothing to convert")
    if args.to == "mindspore":
        s = hf_to_mindspore(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            qkv_layout=args.qkv_layout,
            crc=args.crc,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
    else:
        if not args.config:
            raise UserError(
                "--from mindspore needs the model shapes: --config MINDFORMERS.yaml (the run's YAML) or "
                "--config config.json (the Hugging Face config of the same model)"
            )
        if args.to == "peft":
            return _mindspore_lora(args)
        from qwen15.mindspore.mindformers_config import load_model_config

        config, _ = load_model_config(args.config)
        if args.chat is not None:  # as `--to hf` does: a chat model stops on <|im_end|>
            from qwen15.model_config import ENDOFTEXT_ID, IM_END_ID

            config = config.replace(eos_token_id=IM_END_ID if args.chat else ENDOFTEXT_ID)
        s = mindspore_to_hf(
            args.checkpoint,
            args.out_dir,
            config,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            qkv_layout=args.qkv_layout,
            strategy=args.strategy,
            skip_lora=args.skip_lora,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
    print(f"wrote {args.out_dir} ({s.bytes / 1e6:,.1f} MB in {s.seconds:.1f} s)")
    print("\n".join(s.lines()))
    return 0


def _mindspore_lora(args: argparse.Namespace) -> int:
    from qwen15.mindspore.lora import mindspore_lora_to_peft

    s, spec = mindspore_lora_to_peft(
        args.checkpoint,
        args.out_dir,
        args.config,
        dtype=args.dtype,
        qkv_layout=args.qkv_layout,
        strategy=args.strategy,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out_dir} (PEFT adapter, {s.bytes / 1e6:,.2f} MB in {s.seconds:.1f} s)")
    print(
        f"  {s.mapped} adapted projections ({s.fused} of them split from fused ones), dtype {s.dtype}; r {spec.r}, "
        f"lora_alpha {spec.alpha:g} (scaling {spec.scaling:g}), target_modules {', '.join(spec.target_modules)}"
    )
    if s.lines()[1:]:
        print("\n".join(s.lines()[1:]))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    """SOURCE is a Hugging Face folder, or a training checkpoint exported first to a temporary Hugging Face
    folder beside the output (removed afterwards, whatever happens)."""
    import sys
    import tempfile
    from pathlib import Path

    from qwen15.atomic import check_output_folder
    from qwen15.quantize.saved import quantize_folder
    from qwen15.train.export import export_hf

    source = Path(args.checkpoint)
    out = check_output_folder(args.out_dir, overwrite=args.overwrite, inputs=[source], flag="OUT_DIR")
    hf = any((source / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    if hf:
        quantize_folder(source, out, args.quantize, group_size=args.group_size, overwrite=args.overwrite)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".hf", dir=out.parent) as tmp:
            hf_dir = export_hf(
                args.checkpoint,
                Path(tmp) / "hf",
                dtype="bfloat16",
                chat=args.chat,
                warn=lambda m: print(m, file=sys.stderr),
            )
            quantize_folder(
                hf_dir,
                out,
                args.quantize,
                group_size=args.group_size,
                overwrite=args.overwrite,
                inputs=[source],
            )
    print(f"wrote {out} ({args.quantize})")
    return 0


def _gguf(args: argparse.Namespace) -> int:
    """SOURCE is a Hugging Face folder, or a training checkpoint exported first (float32, so that no rounding
    comes before the GGUF type's) to a temporary folder beside the output, removed afterwards."""
    import sys
    import tempfile
    import time
    from pathlib import Path

    from qwen15.errors import UserError
    from qwen15.gguf_export import check_output, export_gguf
    from qwen15.train.dcp_checkpoint import CheckpointNotFound, DamagedCheckpoint, resolve_checkpoint
    from qwen15.train.export import export_hf

    start = time.perf_counter()
    source, kind = Path(args.checkpoint), args.gguf_type or "f16"
    out = check_output(args.out_dir, overwrite=args.overwrite, inputs=[source])
    if (source / "config.json").is_file():
        if args.chat is not None:
            raise UserError(
                f"--chat/--base apply to a checkpoint; {source} is a Hugging Face folder, whose config.json and "
                "tokenizer give the stop ids"
            )
        s = export_gguf(source, out, kind, overwrite=args.overwrite, quiet=args.quiet)
    else:
        warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
        try:
            ckpt = resolve_checkpoint(source, warn)
        except CheckpointNotFound as e:
            if isinstance(e, DamagedCheckpoint):
                raise
            raise UserError(f"{e}; nor is it a Hugging Face model folder (no config.json)") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".hf", dir=out.parent) as tmp:
            hf_dir = export_hf(ckpt, Path(tmp) / "hf", dtype="float32", chat=args.chat, warn=warn)
            name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
            s = export_gguf(
                hf_dir, out, kind, name=name, overwrite=args.overwrite, inputs=[source], quiet=args.quiet
            )
    seconds = time.perf_counter() - start
    print(
        f"wrote {s.path} (GGUF {s.gguf_type}, {s.tensors} tensors, {s.bytes / 1e6:,.1f} MB in {seconds:.1f} s)"
    )
    return 0
