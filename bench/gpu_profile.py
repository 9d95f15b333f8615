"""Where the GPU time goes: training-step variants and the decode loop, for the next round of speed work.

  python bench/gpu_profile.py [train] [decode] [decode-tuned] [decode-fused] [decode-kernels]
  (on a CUDA machine; on CPU it runs small shapes, to test the script)

Training, 0.5B at seq 4096, micro-batch 2, interleaved steps in one process (as bench/train.py):
  transformers  bf16 parameters + torch AdamW (the reference)
  shipped       our trainer as shipped on one GPU: fp32 master weights, bf16 autocast, compiled blocks and output loss
  eager         the same without compile
then a profiler table of one `shipped` step (top kernels by GPU time) and GPU busy time over wall time.
(The FSDP2 rows of bench/RESULTS.md were measured with this script as of commit 36cfbfa, when one GPU still
trained under FSDP2.)
Decode, 0.5B bf16 batch 1: the whole generate loop vs replaying the compiled step alone (what the loop adds);
decode-tuned: the same with inductor's coordinate-descent tuning of its generated kernels; decode-fused: one
matrix for q/k/v and one for gate/up (`qwen15.fuse.fuse_projections`; the H200 run of RESULTS.md used an equivalent
copy of it inside this script, written before the library had it); decode-kernels: compiled without CUDA graphs, a profiler table of kernels.
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


def decode_part(new_tokens: int = 128, options: dict | None = None, fused: bool = False) -> None:
    print(
        f"== decode loop vs compiled step alone; inductor options {options or 'of mode reduce-overhead'}",
        flush=True,
    )
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
    engine = Generator(model, None, compile=True)
    if options:
        from qwen15.generation import decode_one_token

        engine._step = torch.compile(decode_one_token, options=options, fullgraph=True, dynamic=False)
    prompt = torch.randint(0, 151000, (1, 32)).tolist()
    kw = dict(sampling=SamplingParams(), stop_token_ids=[])
    t0 = time.perf_counter()
    engine.generate(prompt, max_new_tokens=new_tokens, **kw)  # compile
    print(f"first generate (compile) {time.perf_counter() - t0:.0f} s", flush=True)
    best = {}
    for k in (new_tokens, 1):
        runs = []
        for _ in range(3):
            sync()
            t = time.perf_counter()
            engine.generate(prompt, max_new_tokens=k, **kw)
            sync()
            runs.append(time.perf_counter() - t)
        best[k] = min(runs)
    loop = (new_tokens - 1) / (best[new_tokens] - best[1])
    cache, key_mask = engine._buffers
    step = engine._compiled_step()
    tokens = torch.zeros(1, dtype=torch.long, device=DEV)
    pos = torch.full((1,), 40, device=DEV)
    slot = torch.tensor([40], device=DEV)
    with torch.inference_mode():
        for _ in range(3):
            if CUDA:
                torch.compiler.cudagraph_mark_step_begin()
            step(model, cache, tokens, pos, slot, key_mask)
        sync()
        t = time.perf_counter()
        for _ in range(new_tokens):
            if CUDA:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(model, cache, tokens, pos, slot, key_mask)
            tokens.copy_(logits.argmax(-1))  # in place: a new tensor each step made dynamo recompile
        sync()
        replay = new_tokens / (time.perf_counter() - t)
        if CUDA:
            graph_start, graph_end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            graph_start.record()
            for _ in range(new_tokens):
                torch.compiler.cudagraph_mark_step_begin()
                logits = step(model, cache, tokens, pos, slot, key_mask)
            graph_end.record()
            sync()
            gpu = new_tokens / (graph_start.elapsed_time(graph_end) / 1e3)
        else:
            gpu = float("nan")
    if CUDA and options is not None and not options.get("triton.cudagraphs", True):
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(16):
                logits = step(model, cache, tokens, pos, slot, key_mask)
            sync()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / 16
        print(f"kernels per decode step (compiled, no CUDA graph): {kernels:.0f}", flush=True)
        print(
            events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70), flush=True
        )
    print(
        f"generate loop {loop:,.0f} tok/s | compiled step replayed back to back {replay:,.0f} tok/s "
        f"(argmax between steps, no host sync) | replays without argmax {gpu:,.0f} tok/s",
        flush=True,
    )


def main() -> int:
    name = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"# gpu_profile on {name}, torch {torch.__version__}", flush=True)
    parts = sys.argv[1:] or ["train", "decode"]
    tuned = {"triton.cudagraphs": CUDA, "coordinate_descent_tuning": True}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "train": lambda: train_part(Path(tmp), 5),
            "decode": decode_part,
            "decode-tuned": lambda: decode_part(options=tuned),
            "decode-fused": lambda: decode_part(fused=True),
            "decode-kernels": lambda: decode_part(new_tokens=32, options={"triton.cudagraphs": False}),
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
