"""`qwen15 serve --model DIR`: an OpenAI-compatible HTTP server with continuous batching, and a chat page at /.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics, and the
chat page at GET /. Binds 127.0.0.1 unless --host says otherwise; with --api-key (or QWEN15_API_KEY) every
endpoint but /health and the page needs `Authorization: Bearer KEY`. Under torchrun the model is split over the
processes (tensor parallel) and rank 0 serves HTTP. Needs the `serve` extra: pip install -e '.[serve]'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from qwen15.commands.options import SAMPLING_HELP, add_model_arguments, bounded

DEFAULT_MAX_MODEL_LEN = 4096
_UNITS = {
    "": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from "4GiB", "512MiB", "2G", "1e9" or "1000000"."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    unit = (m.group(2) or "").removesuffix("b") if m else None
    if unit is not None and unit.endswith("i"):
        unit += "b"
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 4GiB, 512MiB or 2000000000")
    return int(float(m.group(1)) * _UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    with contextlib.suppress(argparse.ArgumentError):  # the shared model options may define it already
        parser.add_argument(
            "--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) applied to the model"
        )
    g = parser.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    g.add_argument(
        "--port", type=bounded(int, 0, 65535), default=8000, help="port (default 8000; 0 picks a free one)"
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("QWEN15_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $QWEN15_API_KEY; none: no auth)",
    )
    g.add_argument(
        "--served-model-name", metavar="NAME", help="the model id clients use (default: the folder name)"
    )
    g.add_argument(
        "--max-request-bytes",
        type=parse_size,
        default=4 * 2**20,
        metavar="SIZE",
        help="body limit (default 4MiB)",
    )
    e = parser.add_argument_group("engine")
    e.add_argument(
        "--max-num-seqs", type=int, default=16, help="sequences decoding at once at most (default 16)"
    )
    e.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        metavar="SIZE",
        help="bytes for keys and values (default: 80%% of free GPU memory; on CPU a quarter of the available "
        "RAM, at most 4GiB); it decides how many of --max-num-seqs sequences fit",
    )
    e.add_argument(
        "--max-model-len",
        type=int,
        help=f"tokens of one sequence, prompt and completion (default: the model's context, at most "
        f"{DEFAULT_MAX_MODEL_LEN}); each running sequence reserves this many positions",
    )
    e.add_argument(
        "--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step (default 256)"
    )
    e.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting for a slot at most; more get 503 (default 256)",
    )
    e.add_argument("--no-prefix-reuse", action="store_true", help="always recompute the KV of a prompt")
    e.add_argument("--step-log", metavar="FILE", help="append one JSON line per engine step to FILE")
    parser.epilog = SAMPLING_HELP + " Chat requests also stop at <|im_end|> and <|endoftext|>."
    parser.set_defaults(seed=None)  # each request brings its own; load_model's tensor-parallel setup reads it


def default_kv_memory(device) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        available = 8 * 2**30
    return min(4 * 2**30, available // 4)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from qwen15.errors import UserError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"qwen15 serve needs {' and '.join(missing)}: pip install -e '.[serve]'")
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.step_log:  # before the model loads: a log that cannot be written fails at once
        folder = os.path.dirname(os.path.abspath(args.step_log))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(
                f"--step-log {args.step_log}: cannot write in {folder} (no such folder, or not writable); "
                "choose another FILE"
            )

    from qwen15.chat import chat_stop_ids
    from qwen15.commands.options import load_model, tensor_parallel_world
    from qwen15.engine.engine import Engine
    from qwen15.engine.kv_slots import bytes_per_token, size_slots
    from qwen15.generation import chat_sampling_defaults, default_stop_ids, sampling_defaults
    from qwen15.serve.protocol import ServedModel
    from qwen15.serve.runner import Runner, broadcast_commands, follow

    model, tokenizer = load_model(args)  # with --adapter applied
    param = next(model.parameters())
    world = tensor_parallel_world()
    context = model.config.max_position_embeddings
    max_model_len = args.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
    if not 2 <= max_model_len <= context:
        raise UserError(
            f"--max-model-len must be between 2 and the model's context ({context}), got {max_model_len}"
        )
    per_token = bytes_per_token(model.config, param.dtype, world)
    memory = args.kv_cache_memory or default_kv_memory(param.device)
    try:
        slots, max_len = size_slots(
            per_token, context, memory=memory, max_num_seqs=args.max_num_seqs, max_model_len=max_model_len
        )
    except ValueError as e:
        raise UserError(f"--kv-cache-memory: {e}; give more memory or a smaller --max-model-len") from None
    engine = Engine(
        model,
        num_slots=slots,
        max_len=max_len,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        prefix_reuse=not args.no_prefix_reuse,
        static=args.compile,
        valid_vocab=len(tokenizer),
        step_log_path=args.step_log if int(os.environ.get("RANK", "0")) == 0 else None,
    )
    if world > 1:
        import torch.distributed as dist

        engine.sync = broadcast_commands()
        if dist.get_rank() != 0:
            follow(engine)
            return 0
    gc = getattr(model, "generation_config", None)
    served = ServedModel(
        name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        tokenizer=tokenizer,
        max_len=max_len,
        chat_sampling=chat_sampling_defaults(gc),
        completion_sampling=sampling_defaults(gc),
        chat_stop_ids=frozenset(chat_stop_ids(model, tokenizer)),
        completion_stop_ids=frozenset(default_stop_ids(model, tokenizer)),
    )
    note = f"{slots} sequences x {max_len} tokens, KV {slots * (max_len + 1) * per_token / 2**30:.2f} GiB"
    return _serve(args, Runner(engine), served, note)


def _serve(args, runner, served, note: str) -> int:
    import socket

    import uvicorn

    from qwen15.errors import UserError
    from qwen15.serve.app import create_app

    app = create_app(runner, served, api_key=args.api_key or None, max_body=args.max_request_bytes)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # clients may connect as soon as the line below is printed
    except OSError as e:
        raise UserError(
            f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port"
        ) from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    auth = "API key required" if args.api_key else "no API key"
    print(f"serving {served.name} on http://{shown}:{port} ({note}; {auth})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
