"""What `generate`, `chat` and `eval` share: the model and sampling options, and loading the model they name."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from qwen15.model_config import CHAT_SAMPLING

SAMPLING_HELP = (
    "Sampling defaults come from the checkpoint's generation_config.json. When it asks to sample (do_sample) but "
    "lacks a value, qwen15 uses "
    + ", ".join(f"{k} {v}" for k, v in CHAT_SAMPLING.items())
    + " (Qwen1.5-Chat's recommended values; transformers would silently use top_k 50 and temperature 1.0). When "
    "the file is absent or does not sample, decoding is greedy. Stop ids default to the file's eos_token_id."
)


def utf8_text(flag: str):
    """An argparse type for text options: refuses bytes that are not UTF-8 (a terminal in another encoding passes
    them as surrogates, which no tokenizer can encode)."""

    def parse(value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise argparse.ArgumentTypeError(
                f"{flag} is not valid UTF-8 (byte {e.start} of the text); set the terminal to UTF-8 or pass the "
                "text in UTF-8"
            ) from None
        return value

    parse.__name__ = "UTF-8 text"
    return parse


def bounded(kind: type, low: float | None = None, high: float | None = None, *, above: bool = False):
    """An argparse type: an int or a finite float within [low, high] (above=True: strictly greater than low), so
    that a value out of range is refused by the parser with the option's name, before anything loads."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        too_low = low is not None and (value <= low if above else value < low)
        if too_low or (high is not None and value > high):
            lo = "" if low is None else (f"> {low:g}" if above else f">= {low:g}")
            hi = "" if high is None else f"<= {high:g}"
            raise argparse.ArgumentTypeError(
                f"{text} is out of range (must be {' and '.join(x for x in (lo, hi) if x)})"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_arg(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", required=True, metavar="DIR", help="a local Hugging Face folder (config.json, weights)"
    )
    g.add_argument(
        "--adapter",
        metavar="DIR",
        help="a LoRA adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors) to apply "
        "to the model",
    )
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    g.add_argument(
        "--device",
        default="auto",
        type=device_arg,
        help="cpu, cuda, cuda:1 ... (default: cuda when available)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights and activations (default: bf16 on GPU, fp32 on CPU; fp16 overflows in Qwen models)",
    )
    g.add_argument(
        "--quantize",
        choices=["none", "int8", "int4"],
        default="none",
        help="int8 / int4: weight-only int8 (half of bf16's memory) or int4 in groups of 64 columns (about a "
        "quarter); activations bf16 unless --dtype fp32. A folder written by `qwen15 convert --quantize` loads "
        "as it is stored",
    )
    g.add_argument(
        "--threads",
        type=bounded(int, 1),
        default=None,
        help="CPU threads for the matrix products (default: torch's choice, one per core)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled static-shape decode step with CUDA graphs (CUDA only; default: on for CUDA)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    g = parser.add_argument_group("sampling", SAMPLING_HELP)
    g.add_argument(
        "--max-new-tokens", type=bounded(int, 1), default=max_new_tokens, help=f"(default {max_new_tokens})"
    )
    g.add_argument("--temperature", type=bounded(float, 0), help="0 = greedy")
    g.add_argument("--top-k", type=bounded(int, 0), help="0 = off")
    g.add_argument("--top-p", type=bounded(float, 0, 1, above=True), help="1 = off")
    g.add_argument("--repetition-penalty", type=bounded(float, 0, above=True), help="1 = off")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument(
        "--seed", type=bounded(int, 0, 2**63 - 1), help="seed of the sampler (same seed, same output)"
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        type=utf8_text("--stop"),
        help="stop string (repeatable)",
    )
    g.add_argument(
        "--stop-token-id",
        action="append",
        type=bounded(int, 0),
        default=None,
        metavar="ID",
        help="stop id (repeatable; must be in the model's vocabulary)",
    )


def add_draft_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding")
    g.add_argument(
        "--draft-model",
        metavar="DIR",
        help="a smaller Qwen1.5 model (same tokenizer) that proposes tokens for the model to check: the same "
        "output distribution (greedy: the same tokens), fewer forward passes of the large model",
    )
    g.add_argument(
        "--draft-tokens",
        type=bounded(int, 1, 32),
        default=4,
        metavar="K",
        help="tokens the draft proposes per check (default 4)",
    )


def load_draft(args: argparse.Namespace, model, tokenizer):
    """The --draft-model, on the model's device and in its dtype, prepared as the model is; None without one.
    Its tokenizer must be the model's (the draft's tokens are read as the model's)."""
    if not getattr(args, "draft_model", None):
        return None
    from qwen15 import Qwen, Tokenizer
    from qwen15.errors import UserError
    from qwen15.prepare import prepare_for_inference

    if tensor_parallel_world() > 1:
        raise UserError(
            "--draft-model does not combine with tensor parallel (torchrun); use one or the other"
        )
    weight = next(p for p in model.parameters() if p.is_floating_point())
    try:
        draft = Qwen.from_pretrained(args.draft_model, dtype=weight.dtype, device=weight.device)
    except UserError as e:
        raise type(e)(
            f"--draft-model {args.draft_model}: {str(e).removeprefix(f'{args.draft_model}: ')}"
        ) from None
    try:
        theirs = Tokenizer.from_pretrained(args.draft_model)
    except UserError:
        theirs = None  # a folder of weights only: the model's tokenizer is taken as the draft's
    probe = "Speculative decoding 推测解码 <|im_start|>user\n2 + 2 = 4<|im_end|>"
    if theirs is not None and (
        len(theirs) != len(tokenizer) or theirs.encode(probe) != tokenizer.encode(probe)
    ):
        raise UserError(
            f"--draft-model {args.draft_model}: its tokenizer is not the model's ({len(theirs)} vs {len(tokenizer)} "
            "tokens); a draft must share the model's tokenizer (any Qwen1.5 size drafts for any other)"
        )
    from qwen15.speculative import check_draft

    try:
        check_draft(model, draft, tokenizer, args.draft_tokens)
    except UserError as e:
        raise UserError(f"--draft-model {args.draft_model}: {e}") from None
    prepare_for_inference(draft, args.quantize)
    return draft


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampling settings given on the command line (None: the checkpoint's default)."""
    from qwen15.errors import UserError

    if args.greedy and args.temperature not in (None, 0):
        raise UserError(
            f"--greedy and --temperature {args.temperature} contradict each other; give one of them"
        )
    return {
        "temperature": 0.0 if args.greedy else args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }


def tensor_parallel_world() -> int:
    """Processes of a torchrun launch (1 when started plainly): more than one splits the model across them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _load_tensor_parallel(args: argparse.Namespace, device: str, dtype):
    """Under `torchrun --nproc-per-node N`: the model split over N processes (NCCL on GPUs, gloo on CPU). Every
    rank runs the same decoding and picks the same tokens (same seed); only rank 0 writes output."""
    import atexit
    import random

    import torch
    import torch.distributed as dist

    from qwen15.errors import UserError
    from qwen15.parallel.inference import init_inference_mesh, load_for_inference

    if args.quantize != "none":
        raise UserError(
            f"--quantize {args.quantize} does not combine with tensor parallel (torchrun); use one or the other"
        )
    if getattr(args, "adapter", None):
        raise UserError(
            "--adapter does not combine with tensor parallel (torchrun): merge it into the model first "
            "(qwen15 lora merge --model BASE --adapter DIR --output MERGED) and load MERGED"
        )
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    mesh = init_inference_mesh(device_type)
    # Leave together: a rank whose peers already closed their connections aborts in gloo's teardown. (If a rank
    # fails instead, torchrun stops the others.)
    atexit.register(lambda: (dist.barrier(), dist.destroy_process_group()))
    if dist.get_rank() != 0:  # the others compute but stay silent
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        sys.stderr = sys.stdout
    if args.seed is None:  # sampling must draw the same numbers on every rank
        box = [random.randrange(2**31)]
        dist.broadcast_object_list(box, src=0)
        args.seed = box[0]
    if getattr(args, "compile", None) is None:
        args.compile = False  # the compiled CUDA-graph step is for one device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else "cpu"
    model = load_for_inference(args.model, mesh, dtype=dtype, device=local)
    return model, f"tensor parallel over {mesh.size()} processes"


def load_model(args: argparse.Namespace, *, prepare: bool = True):
    """(model, tokenizer) from --model/--adapter/--tokenizer/--device/--dtype/--quantize, with a note on stderr.
    Under torchrun with several processes the model is split across them (tensor parallel); otherwise the LoRA
    adapter, when given, is applied (unmerged) and the model prepared for generation
    (qwen15.prepare_for_inference) unless `prepare` is False."""
    import time

    import torch

    from qwen15 import Qwen, Tokenizer
    from qwen15.errors import UserError
    from qwen15.prepare import prepare_for_inference

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if getattr(args, "compile", None) and not device.startswith("cuda"):
        raise UserError(
            "--compile runs the decode step as CUDA graphs and needs a CUDA device; on CPU decoding runs eager "
            "(leave --compile out)"
        )
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if tensor_parallel_world() > 1:
        model, note = _load_tensor_parallel(args, device, dtype)
    else:
        from qwen15.quantize import load_quantized, quantization_of

        adapter = getattr(args, "adapter", None)
        # a folder of `qwen15 convert --quantize` is loaded as it is stored
        stored = quantization_of(args.model)
        if stored is not None:
            if adapter:
                raise UserError(
                    f"--adapter with --model {args.model}: that folder holds {stored.get('weights')} weights; "
                    "give the unquantized model with --adapter (and --quantize to quantize it after)"
                )
            if args.quantize not in ("none", stored.get("weights")):
                raise UserError(
                    f"--quantize {args.quantize}: {args.model} holds {stored.get('weights')} weights already; "
                    "drop --quantize, or convert the unquantized checkpoint"
                )
            model = load_quantized(args.model, device=device, dtype=dtype)
            note = f"stored {stored.get('weights')}"
        else:
            if adapter:
                from qwen15.lora import load_adapter, read_adapter

                try:
                    read_adapter(adapter)  # a bad adapter folder fails before the model is loaded
                except UserError as e:
                    text = str(e).removeprefix(f"{adapter}: ")
                    raise type(e)(f"--adapter {adapter}: {text}") from None
            if args.quantize != "none" and dtype is None:
                dtype = torch.bfloat16  # quantized weights, bf16 activations unless --dtype says otherwise
            model = Qwen.from_pretrained(args.model, dtype=dtype, device=device)
            note = "plain"
            if adapter:
                spec = load_adapter(model, adapter).lora_spec
                note = f"LoRA adapter {adapter} (r {spec.r}, {', '.join(spec.target_modules)})"
        if prepare:
            quantize = "none" if stored is not None else args.quantize
            done = prepare_for_inference(model, quantize).inference_format
            note = done if note == "plain" else f"{note}, {done}"
    if device == "cpu":
        note += f", {torch.get_num_threads()} threads"
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    check_fit(args, model, tokenizer)
    print(
        f"loaded {args.model} on {device} ({str(next(model.parameters()).dtype).removeprefix('torch.')}, {note}) "
        f"in {time.perf_counter() - t:.1f}s",
        file=sys.stderr,
    )
    return model, tokenizer


def check_fit(args: argparse.Namespace, model, tokenizer) -> None:
    """Refuse a tokenizer with ids beyond the model's embedding, and stop ids outside the vocabulary (both would
    fail deep in the forward pass, or never stop)."""
    from qwen15.errors import UserError

    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        flag = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--model {args.model} (its tokenizer)"
        raise UserError(
            f"{flag}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab} embedding rows; pass "
            "the tokenizer the model was trained with"
        )
    for token_id in getattr(args, "stop_token_id", None) or []:
        if token_id >= vocab:
            raise UserError(
                f"--stop-token-id {token_id}: outside the model's vocabulary (ids 0..{vocab - 1})"
            )
