"""Where the GPU time goes: training-step variants and the decode loop, for the next round of speed work.

  python bench/gpu_profile.py [train] [decode] [decode-fused] [decode-kernels]
  (on a CUDA machine; on CPU it runs small shapes, to test the script)

Training, 0.5B at seq 4096, micro-batch 2, interleaved steps in one process (as bench/train.py):
  transformers  bf16 parameters + torch AdamW (the reference)
  shipped       our trainer as shipped on one GPU: fp32 master weights, bf16 autocast, compiled blocks and output loss
  eager         the same without compile
then a profiler table of one `shipped` step (top kernels by GPU time) and GPU busy time over wall time.
(The FSDP2 rows of bench/RESULTS.md were measured with this script as of commit 36cfbfa, when one GPU still
trained under FSDP2.)
Decode, 0.5B bf16 batch 1: the whole generate loop vs the engine's decode step alone, replayed as its CUDA graph
(what the loop adds); decode-fused: one matrix for q/k/v and one for gate/up (`qwen15.fuse.fuse_projections`);
decode-kernels: a profiler table of the kernels of one eager decode step. (The decode rows of RESULTS.md up to
the serving engine were measured with the compiled step this script profiled then: torch.compile
reduce-overhead.)
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("train_bench", HERE / "train.py")
train_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_bench)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def trainer_variant(name: str, tmp: Path):
    """(trainer, step) for one variant of our training step on the bench's 0.5B case."""
    from qwen15.train.trainer import Trainer

    case = "cuda-0.5b" if CUDA else "cpu-demo"
    trainer, step, batch = train_bench.ours(case, tmp / name, compile=name == "shipped")
    assert isinstance(trainer, Trainer)
    return trainer, step, batch


def train_part(tmp: Path, reps: int) -> None:
    print("== training step variants", flush=True)
    steps, trainers, batch = {}, [], None
    for name in ("shipped", "eager"):
        try:
            t0 = time.perf_counter()
            trainer, step, batch = trainer_variant(name, tmp)
            for _ in range(2):
                step()  # compile and warm up
            sync()
            print(f"{name}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
            steps[name], trainers = step, trainers + [trainer]
        except Exception as e:  # one broken variant must not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
    ref = train_bench.reference("cuda-0.5b", batch, trainers[0])
    ref()
    ref()
    steps["transformers"] = ref
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            times[k] += train_bench.timed(step, DEV, 1)
    tokens = batch["input_ids"].numel()
    base = tokens / statistics.median(times["transformers"])
    for k, ts in times.items():
        tps = tokens / statistics.median(ts)
        print(f"  {k:13s} {tps:10,.0f} tok/s  {tps / base:.2f}x transformers", flush=True)

    if CUDA:
        from torch.profiler import ProfilerActivity, profile

        step = steps["shipped"]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            step()
            sync()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e6
        print(
            f"shipped step under the profiler: wall {wall * 1e3:.1f} ms, kernels {busy * 1e3:.1f} ms",
            flush=True,
        )
        print(
            events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True
        )
    for trainer in trainers:
        trainer.close()


def decode_part(new_tokens: int = 128, fused: bool = False, kernels: bool = False) -> None:
    print("== decode: the generate loop vs the engine's decode step alone (CUDA graphs on GPU)", flush=True)
    from qwen15 import Qwen
    from qwen15.generation import Generator
    from qwen15.model_config import get_preset
    from qwen15.sampling import SamplingParams

    cfg = get_preset("qwen1.5-0.5b" if CUDA else "tiny")
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = Qwen.from_config(cfg, dtype=dtype, device=DEV)
    if fused:
        print("fused q/k/v and gate/up matrices", flush=True)
        from qwen15.fuse import fuse_projections

        fuse_projections(model)
    gen = Generator(model, None, compile=CUDA)
    prompt = torch.randint(0, 151000, (1, 32)).tolist()
    kw = dict(sampling=SamplingParams(), stop_token_ids=[])
    t0 = time.perf_counter()
    gen.generate(prompt, max_new_tokens=new_tokens, **kw)  # captures the graphs it needs
    print(f"first generate (capture) {time.perf_counter() - t0:.1f} s", flush=True)
    best = {}
    for k in (new_tokens, 1):
        runs = []
        for _ in range(3):
            sync()
            t = time.perf_counter()
            gen.generate(prompt, max_new_tokens=k, **kw)
            sync()
            runs.append(time.perf_counter() - t)
        best[k] = min(runs)
    loop = (new_tokens - 1) / (best[new_tokens] - best[1])
    step = gen.engine.decode  # the batched decode forward (slot 0, one sequence at position 40)
    with torch.inference_mode():
        for _ in range(3):
            step([0], [0], [40])
        sync()
        t = time.perf_counter()
        for _ in range(new_tokens):
            step([0], [0], [40])
        sync()
        alone = new_tokens / (time.perf_counter() - t)
        if CUDA and kernels:
            from torch.profiler import ProfilerActivity, profile

            eager = type(step)(model, gen.engine.cache, static=False, graphs=False)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(16):
                    eager([0], [0], [40])
                sync()
            events = prof.key_averages()
            count = sum(e.count for e in events if e.device_type.name == "CUDA") / 16
            print(f"kernels per decode step (eager, no CUDA graph): {count:.0f}", flush=True)
            print(
                events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70),
                flush=True,
            )
    print(
        f"generate loop {loop:,.0f} tok/s | decode step alone, back to back {alone:,.0f} tok/s "
        f"(graphs captured: {step.captured})",
        flush=True,
    )


def main() -> int:
    name = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"# gpu_profile on {name}, torch {torch.__version__}", flush=True)
    parts = sys.argv[1:] or ["train", "decode"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "train": lambda: train_part(Path(tmp), 5),
            "decode": decode_part,
            "decode-fused": lambda: decode_part(fused=True),
            "decode-kernels": lambda: decode_part(new_tokens=32, kernels=True),
        }
        for part in (runs[p] for p in parts):
            try:
                part()
            except Exception:
                import traceback

                traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
