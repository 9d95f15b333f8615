"""LoRA training: qwen15's step vs transformers + PEFT + torch AdamW, its memory vs our full finetune, and an int8
base (QLoRA-like) against a bf16 one.

  python bench/lora.py                       # all of it on CPU (a few minutes on 2 cores)
  python bench/lora.py --only speed          # or memory, int8
  python bench/lora.py --only speed --case cuda-7b   # on a GPU: 7B at seq 4096, bf16

speed: the same shape, batch and work per step on both sides (forward, token-mean cross-entropy, backward,
  clip to norm 1.0, AdamW over the adapters; rank 16, alpha 32, every projection, no dropout), in one process,
  interleaved so that the noise of a shared machine hits both alike; median tokens/s and their ratio. Ours is the
  real `Trainer.train_step` of a lora run (frozen base, fp32 adapters). The plain CPU cases compute in fp32 on
  both sides; the -bf16 cases (and CUDA) in the LoRA recipes' regime, a bf16 frozen base and bf16 compute, against
  the faster of transformers + PEFT with its bf16 base as loaded and the same under torch.autocast.
memory: each of (LoRA, full finetune) in its own process: the peak resident memory (VmHWM) of a few trainer steps
  above the process's size before the model was built (CPU), or torch's peak allocation (GPU); their ratio.
int8: the same LoRA finetune (the demo's addition task on a briefly pretrained demo-sized model, bf16 compute)
  with the base in bf16 and in int8: both loss curves, and the base's bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = {
    # name: (preset, layers override, batch, seq, device, dtype)
    "cpu-tiny": ("tiny", None, 4, 128, "cpu", "float32"),
    "cpu-0.5b-2layers": ("qwen1.5-0.5b", 2, 1, 256, "cpu", "float32"),
    # The LoRA recipes' regime: a bf16 frozen base, bf16 compute, fp32 adapters.
    "cpu-tiny-bf16": ("tiny", None, 4, 128, "cpu", "bfloat16"),
    "cpu-0.5b-2layers-bf16": ("qwen1.5-0.5b", 2, 1, 256, "cpu", "bfloat16"),
    "cuda-7b": ("qwen1.5-7b", None, 1, 4096, "cuda", "bfloat16"),
}
LORA = ["--lora.r", "16", "--lora.alpha", "32"]


def trainer_for(case: str, tmp: Path, lora: bool):
    from qwen15.data.writer import write_documents
    from qwen15.train.config import load_config
    from qwen15.train.trainer import Trainer

    preset, layers, batch, seq, device, dtype = CASES[case]
    rows = np.random.default_rng(0).integers(0, 151643, (max(batch, 8), seq + 1)).astype(np.uint32)
    data = write_documents(
        tmp / case / "data", [(r, [True] * len(r)) for r in rows.tolist()], seq_length=seq, layout="pad"
    )
    args = ["--model.preset", preset, "--data.path", str(data), "--train.run_dir", str(tmp / case / "run")]
    args += ["--train.global_batch_size", str(batch), "--train.micro_batch_size", str(batch)]
    args += ["--train.device", device, "--train.dtype", dtype, "--train.steps", "1000", "--optim.lr", "1e-4"]
    args += ["--metrics.plot", "false", "--metrics.tensorboard", "false", "--checkpoint.resume", "never"]
    if layers:
        args += ["--model.num_hidden_layers", str(layers)]
    if device == "cuda":
        args += ["--train.compile", "true", "--train.activation_checkpointing", "false"]
    if lora:
        args += LORA + (["--lora.base_dtype", "bfloat16"] if dtype == "bfloat16" else [])
    trainer = Trainer(load_config(None, args), echo=lambda m: None)
    return trainer, trainer.dataset.batch(list(range(batch)))


def peft_reference(trainer, b, autocast: bool = False):
    """transformers' Qwen2ForCausalLM of the same shape with PEFT adapters of the same rank and targets, in the
    trainer's dtype (bf16: the base in bf16, as transformers loads a Qwen1.5 checkpoint, and PEFT's adapters in
    fp32; with `autocast`, under torch.autocast as our trainer runs)."""
    from decode import hf_config_dict
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = trainer.device
    dtype = trainer.compute_dtype
    config = Qwen2Config(**hf_config_dict(trainer.model_config), attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    ids = b["input_ids"].to(device)

    def step():
        with torch.autocast(device.type, dtype, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def speed(case: str, reps: int, tmp: Path) -> dict:
    trainer, b = trainer_for(case, tmp, lora=True)

    def ours():
        trainer.train_step(b)

    refs = {"peft": peft_reference(trainer, b)}
    if trainer.compute_dtype != torch.float32:  # the faster of PEFT's two ways is the reference
        refs["peft+autocast"] = peft_reference(trainer, b, autocast=True)
    steps = {"ours": ours, **refs}
    for _ in range(2):  # warm-up (compile, allocator)
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, trainer.device))
    tokens = b["input_ids"].numel()
    trainer.close()
    row = {"case": case, "tokens": tokens, **{n: tokens / statistics.median(t) for n, t in times.items()}}
    row["reference"] = max(refs, key=lambda n: row[n])
    row["ratio"] = row["ours"] / row[row["reference"]]
    return row


def _status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc: unlike getrusage's ru_maxrss, which a child keeps
    from its parent across fork + exec, the high-water mark starts with the process's own memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def memory_child(case: str, lora: bool, steps: int) -> dict:
    """Run in a fresh process: peak memory of `steps` trainer steps above the size before the model."""
    with tempfile.TemporaryDirectory() as tmp:
        before = _status_bytes("VmRSS")
        trainer, b = trainer_for(case, Path(tmp), lora)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            trainer.train_step(b)
        if trainer.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_bytes("VmHWM") - before
        trainer.close()
    return {"case": case, "lora": lora, "peak_bytes": peak}


def memory(case: str, steps: int) -> dict:
    out = {}
    for lora in (True, False):
        cmd = [sys.executable, __file__, "--memory-child", case, "--steps", str(steps)] + (
            ["--lora"] if lora else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out["lora" if lora else "full"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    out["ratio"] = out["lora"] / out["full"]
    return out


def int8_curves(steps: int, tmp: Path) -> dict:
    """The demo's stages 1-2 at a small budget (tokenizer, brief pretraining), then the same LoRA finetune on its
    addition questions with a bf16 and an int8 base (bf16 compute under autocast, as on one GPU)."""
    import dataclasses

    from qwen15.data.sft import preprocess_chat
    from qwen15.demo import addition
    from qwen15.demo.pipeline import Demo, DemoBudget, _schedule, _train, pretrain, train_tokenizer
    from qwen15.train.metrics import read_metrics

    budget = dataclasses.replace(DemoBudget(), seq_length=128, docs_chars=60_000, pretrain_steps=60)
    d = Demo(tmp / "demo", budget, lambda m: None)
    train_tokenizer(d)
    pretrain(d)
    convs = addition.training_conversations(2000, 0, budget.digits)
    source = tmp / "demo" / "addition.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    data = tmp / "demo" / "addition"
    preprocess_chat(
        [source], data, d.tokenizer, seq_length=128, layout="pack", loss_on="assistant", quiet=True
    )
    curves, sizes = {}, {}
    for base in ("bfloat16", "int8"):
        settings = {**d.common_settings(), "train.mode": "finetune", "model.path": d.pretrained}
        settings.update({"data.path": data, "train.run_dir": tmp / base, **_schedule(steps, 8, 3e-3)})
        settings.update({"train.dtype": "bfloat16", "lora.r": 16, "lora.alpha": 32, "lora.base_dtype": base})
        _train(settings, lambda m: None)
        curves[base] = [r["loss"] for r in read_metrics(tmp / base / "metrics.jsonl")]
    from qwen15.lora import LoRASpec
    from qwen15.model_config import get_preset
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_lora_memory

    for base in ("bfloat16", "int8"):
        est = estimate_lora_memory(
            get_preset("qwen1.5-7b"), ParallelLayout(), LoRASpec(16, 32), micro_batch_size=1, seq_len=4096,
            base_dtype=base, world_size=1,
        )  # fmt: skip
        sizes[base] = est.parameters / 2**30
    return {"curves": curves, "qwen1.5-7b_parameters_gib": sizes}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["speed", "memory", "int8"], action="append")
    parser.add_argument("--case", choices=list(CASES), action="append")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="trainer steps per memory measurement")
    parser.add_argument("--int8-steps", type=int, default=150)
    parser.add_argument("--memory-child", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.lora, args.steps)))
        return 0
    parts = args.only or ["speed", "memory", "int8"]
    cases = args.case or [c for c in CASES if not c.startswith("cuda") or torch.cuda.is_available()]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if "speed" in parts:
                r = speed(case, args.reps, Path(tmp))
                peft = " | ".join(
                    f"transformers+{n.replace('peft', 'PEFT')}+AdamW {r[n]:,.0f} tok/s"
                    for n in ("peft", "peft+autocast") if n in r
                )  # fmt: skip
                print(
                    f"speed {case}: {r['tokens']} tokens/step | qwen15 LoRA {r['ours']:,.0f} tok/s | {peft} | "
                    f"{r['ratio']:.2f}x of {r['reference']}",
                    flush=True,
                )
            if "memory" in parts:
                m = memory(case, args.steps)
                print(
                    f"memory {case}: peak of the step, LoRA {m['lora'] / 2**20:,.0f} MiB | full finetune "
                    f"{m['full'] / 2**20:,.0f} MiB | {m['ratio']:.2f}x",
                    flush=True,
                )
        if "int8" in parts:
            r = int8_curves(args.int8_steps, Path(tmp))
            bf16, int8 = r["curves"]["bfloat16"], r["curves"]["int8"]
            every = max(1, len(bf16) // 10)
            print("int8 base vs bf16 base, LoRA finetune loss (every", every, "steps):")
            print("  bf16: " + " ".join(f"{x:.3f}" for x in bf16[::every]) + f" ... {bf16[-1]:.3f}")
            print("  int8: " + " ".join(f"{x:.3f}" for x in int8[::every]) + f" ... {int8[-1]:.3f}")
            diff = max(abs(a - b) / b for a, b in zip(bf16, int8))
            print(f"  largest relative difference of a step's loss: {100 * diff:.2f}%")
            sizes = r["qwen1.5-7b_parameters_gib"]
            print(f"  Qwen1.5-7B LoRA parameters (memory model): bf16 base {sizes['bfloat16']:.1f} GiB, "
                  f"int8 base {sizes['int8']:.1f} GiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
