"""`qwen15 generate --model DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts (the seed's predict).

Raw continuation, no chat template; several prompts run as one batch. Also holds the model-loading and sampling
options shared by `qwen15 chat` and `qwen15 eval`.
"""

from __future__ import annotations

import argparse
import sys

SAMPLING_HELP = (
    "Sampling defaults come from the checkpoint's generation_config.json. When it asks to sample (do_sample) but "
    "lacks a value, qwen15 uses temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.1 (Qwen1.5-Chat's "
    "recommended values; transformers would silently use top_k 50 and temperature 1.0). When the file is absent "
    "or does not sample, decoding is greedy. Stop ids default to the file's eos_token_id."
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", required=True, metavar="DIR", help="a local Hugging Face folder (config.json, weights)"
    )
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
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
        type=int,
        default=None,
        help="CPU threads for the matrix products (default: torch's choice, one per core)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled static-shape decode step with CUDA graphs (default: on for CUDA, off on CPU)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    g = parser.add_argument_group("sampling", SAMPLING_HELP)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default {max_new_tokens})")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="0 = off")
    g.add_argument("--top-p", type=float, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, help="1 = off")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument("--seed", type=int, help="seed of the sampler (same seed, same output)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument(
        "--stop-token-id", action="append", type=int, default=None, metavar="ID", help="stop id (repeatable)"
    )


def tensor_parallel_world() -> int:
    """Processes of a torchrun launch (1 when started plainly): more than one splits the model across them."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _load_tensor_parallel(args: argparse.Namespace, device: str, dtype):
    """Under `torchrun --nproc-per-node N`: the model split over N processes (NCCL on GPUs, gloo on CPU). Every
    rank runs the same decoding and picks the same tokens (same seed); only rank 0 writes output."""
    import atexit
    import os
    import random

    import torch
    import torch.distributed as dist

    from qwen15.errors import UserError
    from qwen15.parallel.inference import init_inference_mesh, load_for_inference

    if args.quantize != "none":
        raise UserError(
            f"--quantize {args.quantize} does not combine with tensor parallel (torchrun); use one or the other"
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
    return model, f", tensor parallel over {mesh.size()} processes"


def load_model(args: argparse.Namespace):
    """(model, tokenizer) from --model/--tokenizer/--device/--dtype/--quantize, with a note on stderr. Under
    torchrun with several processes the model is split across them (tensor parallel)."""
    import time

    import torch

    from qwen15 import Qwen, Tokenizer
    from qwen15.errors import UserError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: give a positive number")
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    note = ""
    from qwen15.quantize import describe, quantization_of

    stored = quantization_of(args.model) if tensor_parallel_world() == 1 else None
    if stored is not None:  # a folder of `qwen15 convert --quantize`: load its int8/int4 tensors as they are
        from qwen15.quantize import load_quantized

        if args.quantize not in ("none", stored.get("weights")):
            raise UserError(
                f"--quantize {args.quantize}: {args.model} holds {stored.get('weights')} weights already; drop "
                "--quantize, or convert the unquantized checkpoint"
            )
        model = load_quantized(args.model, device=device, dtype=dtype)
    elif tensor_parallel_world() > 1:
        model, note = _load_tensor_parallel(args, device, dtype)
    else:
        if args.quantize != "none" and dtype is None:
            dtype = torch.bfloat16  # quantized weights, bf16 activations unless --dtype says otherwise
        model = Qwen.from_pretrained(args.model, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    if tensor_parallel_world() == 1:  # a split model is neither fused, quantized nor packed
        model.fuse_projections()  # fewer, larger matrix products per decode step; the same outputs
        if stored is None and args.quantize != "none":
            from qwen15.quantize import quantize

            quantize(model, args.quantize)
        elif stored is None:
            from qwen15.quantize import can_pack_for_cpu, pack_for_cpu

            if can_pack_for_cpu(model):  # CPU: faster matrix-vector products (bf16 exact, fp32 to rounding)
                pack_for_cpu(model)
        note = f"; {describe(model)}"
        if device == "cpu":
            note += f"; {torch.get_num_threads()} threads"
    print(
        f"loaded {args.model} on {device} ({next(model.parameters()).dtype}{note}) in "
        f"{time.perf_counter() - t:.1f}s",
        file=sys.stderr,
    )
    return model, tokenizer


def sampling_overrides(args: argparse.Namespace) -> dict:
    out = {
        "temperature": 0.0 if args.greedy else args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
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

    model, tokenizer = load_model(args)
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        seed=args.seed,
        compile=args.compile,
        **sampling_overrides(args),
    )
    if args.stream:
        if len(args.prompt) != 1:
            raise UserError("--stream takes one --prompt")
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
