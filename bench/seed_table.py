"""The seed's published performance table (docs: SEED.md, Ascend Atlas 800T A2 / 900 A2 PoDc) beside the same rows
measured on the hardware at hand with qwen15, random weights.

  finetune / pretrain rows: the trainer's own step (Trainer.train_step: forward, global-token loss, backward, clip,
    fused AdamW over fp32 master weights) on ONE device, micro-batch 1 at the row's sequence length, bf16 autocast
    on CUDA (fp32 on CPU); the first of no / selective / full activation checkpointing whose memory estimate
    (qwen15.parallel.memory) fits the device. The seed's figures are per device of an 8- to 64-device job.
  predict rows: batch-1 greedy decoding with qwen15's Generator, bf16 on CUDA (fp32 on CPU), a 32-token prompt:
    (new tokens - 1) / (time of N tokens - time of 1 token), i.e. the decode steps without the prefill.
A row whose estimate does not fit is printed as "skipped (needs N GiB)", never dropped.

  python bench/seed_table.py                      # every row, on CUDA when there is a GPU
  python bench/seed_table.py --only 0.5B --only 7B
  python bench/seed_table.py --quick              # CPU, tiny shapes, seq <= 64: checks the script (< 1 min)
  python bench/seed_table.py --plan --memory-gib 135   # which rows an H200 runs, how, and the estimates
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GIB = 2**30


@dataclass(frozen=True)
class SeedRow:
    model: str  # 0.5B, 1.8B ...
    phase: str  # finetune, pretrain, predict
    data: str
    seq: int
    published: float  # tokens/s per device (predict: tokens/s)
    hardware: str


A2, PODC = "Atlas 800T A2", "Atlas 900 A2 PoDc"
SEED_TABLE = [
    SeedRow("7B", "finetune", "alpaca", 4096, 2684, A2),
    SeedRow("7B", "pretrain", "Wikitext-103", 32768, 1417, A2),
    SeedRow("14B", "finetune", "alpaca", 4096, 1452, A2),
    SeedRow("0.5B", "predict", "-", 8192, 1491, A2),
    SeedRow("1.8B", "predict", "-", 4096, 1179, A2),
    SeedRow("4B", "predict", "-", 4096, 625, A2),
    SeedRow("7B", "predict", "-", 8192, 164, A2),
    SeedRow("14B", "predict", "-", 8192, 104, A2),
    SeedRow("32B", "predict", "-", 4096, 245, A2),
    SeedRow("72B", "predict", "-", 8192, 74, A2),
    SeedRow("0.5B", "finetune", "alpaca", 8192, 21171, PODC),
    SeedRow("1.8B", "finetune", "alpaca", 8192, 11241, PODC),
    SeedRow("4B", "finetune", "alpaca", 8192, 4844, PODC),
    SeedRow("32B", "finetune", "alpaca", 8192, 671, PODC),
    SeedRow("14B", "pretrain", "Wikitext-103", 32768, 787, PODC),
    SeedRow("72B", "pretrain", "Wikitext-103", 32768, 183, PODC),
]
QUICK_SHAPE = {"vocab_size": 512, "num_hidden_layers": 2}  # on the tiny preset
PROMPT = 32


def model_config(row: SeedRow, quick: bool):
    from qwen15.model_config import get_preset

    if quick:
        return get_preset("tiny").replace(**QUICK_SHAPE)
    return get_preset(f"qwen1.5-{row.model.lower()}")


def available_gib(device: torch.device, override: float | None) -> float:
    """Memory the run may use: the GPU's total less what the memory model leaves aside (CUDA context, caching),
    or the host's available memory."""
    from qwen15.parallel.memory import RESERVED_GIB

    if override is not None:
        return override
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / GIB - RESERVED_GIB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB


def training_setting(config, seq: int, device: torch.device, limit: float) -> tuple[dict | None, float]:
    """The cheapest-in-time setting whose estimate fits `limit` GiB, and its estimate (the smallest estimate when
    none fits)."""
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    cuda = device.type == "cuda"
    chunk = 4096 if seq > 8192 else 0  # the loss over 152k logits, a chunk at a time, at 32k tokens
    best = None
    for checkpointing in (False, "selective", True):
        est = estimate_memory(
            config,
            ParallelLayout().validate(1, config),
            micro_batch_size=1,
            seq_len=seq,
            param_dtype="float32",
            compute_dtype="bfloat16" if cuda else "float32",
            activation_checkpointing=checkpointing,
            loss_chunk_size=chunk,
            autocast=cuda,
        )
        gib = est.total / GIB
        best = gib if best is None else min(best, gib)
        if gib <= limit:
            return {"activation_checkpointing": checkpointing, "loss_chunk_size": chunk}, gib
    return None, best


def measure_training(config, seq: int, setting: dict, device, tmp: Path, steps: int, compile: bool) -> float:
    """Tokens/s of Trainer.train_step on one device (median of `steps` after one warm-up step)."""
    from qwen15.data.writer import write_documents
    from qwen15.train.config import load_config
    from qwen15.train.trainer import Trainer

    rows = np.random.default_rng(0).integers(0, min(config.vocab_size, 151643), (2, seq + 1))
    data = write_documents(tmp / "data", [(r, [True] * len(r)) for r in rows.tolist()], seq_length=seq)
    args = ["--data.path", str(data), "--train.run_dir", str(tmp / "run"), "--train.device", device.type]
    args += ["--model.config", str(tmp / "config.json")]
    config.save_json(tmp / "config.json")
    values = {
        "train.global_batch_size": 1,
        "train.micro_batch_size": 1,
        "train.steps": steps + 10,
        "train.compile": compile,
        "train.activation_checkpointing": setting["activation_checkpointing"],
        "train.loss_chunk_size": setting["loss_chunk_size"],
        "optim.lr": 1e-5,
        "metrics.plot": False,
        "metrics.tensorboard": False,
        "checkpoint.resume": "never",
    }
    for key, value in values.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    trainer = Trainer(load_config(None, args), echo=lambda m: None)
    try:
        batch = trainer.dataset.batch([0])
        times = []
        for i in range(steps + 1):
            sync(device)
            t = time.perf_counter()
            trainer.train_step(batch)
            sync(device)
            if i:  # the first step compiles and warms the allocator
                times.append(time.perf_counter() - t)
    finally:
        trainer.close()
    return seq / statistics.median(times)


def predict_gib(config, seq: int, device) -> float:
    """Weights in the decode dtype, the KV cache of one row, and 1 GiB of workspace."""
    width = 2 if device.type == "cuda" else 4
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * seq * width
    return (config.num_params() * width + kv) / GIB + 1


def measure_decode(config, device, new_tokens: int, compile: bool) -> float:
    """Batch-1 greedy decode tokens/s (prefill excluded: the time of one token is subtracted)."""
    from qwen15 import Qwen
    from qwen15.generation import Generator
    from qwen15.prepare import prepare_for_inference
    from qwen15.sampling import SamplingParams

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = prepare_for_inference(Qwen.from_config(config, dtype=dtype, device=device, seed=0).eval())
    engine = Generator(model, None, compile=compile)
    prompt = torch.randint(
        0, min(config.vocab_size, 151643), (PROMPT,), generator=torch.Generator().manual_seed(0)
    )

    def run(k: int) -> float:
        sync(device)
        t = time.perf_counter()
        engine.generate([prompt.tolist()], max_new_tokens=k, sampling=SamplingParams(), stop_token_ids=[])
        sync(device)
        return time.perf_counter() - t

    run(new_tokens)  # warm-up (graphs, allocator)
    rates = [(new_tokens - 1) / max(run(new_tokens) - run(1), 1e-9) for _ in range(2)]
    return statistics.median(rates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gib(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def describe(setting: dict) -> str:
    ac = {False: "no checkpointing", "selective": "selective checkpointing", True: "full checkpointing"}
    text = ac[setting["activation_checkpointing"]]
    return text + (f", loss chunks of {setting['loss_chunk_size']}" if setting["loss_chunk_size"] else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--only", action="append", help="model sizes to measure (0.5B, 7B ...); others print skipped"
    )
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, seq <= 64: checks the script")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per row (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens per predict row")
    p.add_argument("--compile", action="store_true", help="train.compile, and compiled decoding on CUDA")
    p.add_argument("--memory-gib", type=float, help="memory the rows may use (default: the device's)")
    p.add_argument("--plan", action="store_true", help="settings and memory estimates only, nothing measured")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.quick else args.device)
    if args.quick:
        args.steps, args.new_tokens = min(args.steps, 2), min(args.new_tokens, 8)
    torch.manual_seed(0)
    if device.type == "cuda" and not torch.cuda.is_available():
        if not (args.plan and args.memory_gib):
            p.error("no GPU here: --device cuda needs one (or --plan with --memory-gib, to plan for one)")
        machine = "a CUDA device (planned, not present)"
    elif device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"CPU, {torch.get_num_threads()} threads"
    limit = available_gib(device, args.memory_gib)
    print(f"# seed table: {machine}, torch {torch.__version__}, {limit:.1f} GiB usable")
    if args.quick:
        print(
            "# --quick: every row runs the tiny shape (2 layers, hidden 128, vocabulary 512) at seq <= 64 on CPU;"
        )
        print("# the figures check the script, they are not comparable with the seed's")
    print(
        "| model | phase | data | seq | seed tokens/s/device | seed hardware | here tokens/s/device | here / seed | how |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    mode = "compiled" if args.compile else "eager"
    cache: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory(prefix="qwen15-seed-table.") as tmp:
        for n, row in enumerate(SEED_TABLE):
            config = model_config(row, args.quick)
            seq = min(row.seq, 64) if args.quick else row.seq
            head = f"| {row.model} | {row.phase} | {row.data} | {row.seq} | {row.published:,.0f} | {row.hardware} |"
            if args.only and row.model not in args.only:
                print(f"{head} skipped (not in --only) | | |", flush=True)
                continue
            if row.phase == "predict":
                need = predict_gib(config, seq, device)
                how = f"batch 1, prompt {PROMPT}, {args.new_tokens} new tokens, {mode}"
                if need > limit:
                    print(f"{head} skipped (needs {gib(need)} GiB) | | {how} |", flush=True)
                    continue
                if args.plan:
                    print(f"{head} not measured (--plan) | | {how}, estimate {gib(need)} GiB |", flush=True)
                    continue
                key = ("predict", repr(config), seq)
                if key not in cache:
                    cache[key] = measure_decode(config, device, args.new_tokens, args.compile)
                    free(device)
            else:
                setting, need = training_setting(config, seq, device, limit)
                if setting is None:
                    print(
                        f"{head} skipped (needs {gib(need)} GiB) | | micro-batch 1, one device |", flush=True
                    )
                    continue
                how = f"micro-batch 1, one device, {describe(setting)}, {mode}, estimate {gib(need)} GiB"
                if args.plan:
                    print(f"{head} not measured (--plan) | | {how} |", flush=True)
                    continue
                key = ("train", repr(config), seq, tuple(setting.items()))
                if key not in cache:
                    folder = Path(tmp) / f"row-{n}"
                    folder.mkdir()
                    cache[key] = measure_training(
                        config, seq, setting, device, folder, args.steps, args.compile
                    )
                    free(device)
            rate = cache[key]
            ratio = "-" if args.quick else f"{rate / row.published:.2f}x"
            print(f"{head} {rate:,.0f} | {ratio} | {how} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
