"""Training-step throughput: qwen15's trainer step vs transformers' Qwen2ForCausalLM in a plain loop, two ways.

Every side gets the same shape, the same batch and the same work per step (forward, token-mean cross-entropy,
backward, clip to global norm 1.0, AdamW), in the same process, interleaved, so that the ratios hold on a noisy
shared machine. Ours is the real `Trainer.train_step` (micro-batching, global-token loss, clipping, AdamW with
decay groups, schedule), fed by a dataset folder of random tokens. The two baselines:
  eager     transformers as ANCHORS.md measured it: eager, torch's default AdamW (bf16 parameters on CUDA);
  compiled  transformers with torch.compile over the model and its loss, fp32 parameters under bf16 autocast on
            CUDA (our numerics), and the very optimizer our trainer builds (qwen15.train.optim.build_optimizer:
            fused AdamW, the same decay groups): the same AdamW implementation on both sides. On CPU only with
            --compile-cpu (compiling takes minutes there).
Each ratio names its baseline.

  python bench/train.py                 # CPU: tiny and a 0.5B-width 2-layer subset; GPU too when one exists
  python bench/train.py --only cpu-tiny --compile-cpu
  python bench/train.py --only cuda-0.5b --packed-only   # packed rows: document mask vs across documents
  python bench/train.py --only cuda-0.5b --optimizer-only   # the AdamW update alone, fused vs foreach
On CUDA: 0.5B at seq 4096, micro-batch 2, bf16 — ours as one process trains (fp32 master weights, bf16 autocast)
with train.compile (the blocks, and the output layer with its cross-entropy), transformers with bf16 parameters
and AdamW (what ANCHORS.md measured) — with MFU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = {
    # name: (preset, layers override, batch, seq, device)
    "cpu-demo": ("demo", None, 2, 256, "cpu"),  # the shape `qwen15 demo` trains (vocabulary 512)
    "cpu-tiny": ("tiny", None, 4, 128, "cpu"),
    "cpu-0.5b-2layers": ("qwen1.5-0.5b", 2, 1, 256, "cpu"),
    "cuda-0.5b": ("qwen1.5-0.5b", None, 2, 4096, "cuda"),
}


def packed_documents(seq: int, rows: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """Documents of seq/16 to seq/2 tokens, enough to pack `rows` rows of seq tokens (the first token of each carries
    no loss once packed, as the data pipeline writes them)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < rows * seq * 1.1:
        n = int(rng.integers(max(2, seq // 16), seq // 2))
        docs.append((rng.integers(0, vocab, n).tolist(), [True] * n))
        total += n
    return docs


def ours(
    case: str,
    tmp: Path,
    compile: bool = True,
    compile_cpu: bool = False,
    packed: bool = False,
    document_mask: bool | None = None,
):
    from qwen15.data.writer import write_documents
    from qwen15.train.config import load_config
    from qwen15.train.trainer import Trainer

    preset, layers, batch, seq, device = CASES[case]
    shape = []
    if preset == "demo":
        preset = "tiny"
        for key, value in (
            ("vocab_size", 512),
            ("hidden_size", 128),
            ("intermediate_size", 384),
            ("num_hidden_layers", 4),
            ("num_attention_heads", 4),
            ("num_key_value_heads", 4),
        ):
            shape += [f"--model.{key}", str(value)]
    vocab = 512 if shape else 151643
    name = f"{case}-packed-{document_mask}" if packed else case
    if packed:
        data = write_documents(
            tmp / name / "data", packed_documents(seq, max(batch, 8), vocab), seq_length=seq
        )
    else:
        rows = np.random.default_rng(0).integers(0, vocab, (max(batch, 8), seq + 1)).astype(np.uint32)
        data = write_documents(
            tmp / name / "data", [(r, [True] * len(r)) for r in rows.tolist()], seq_length=seq, layout="pad"
        )
    args = [
        "--model.preset",
        preset,
        "--data.path",
        str(data),
        "--train.run_dir",
        str(tmp / name / "run"),
        "--train.document_mask",
        "null" if document_mask is None else str(document_mask).lower(),
        "--train.global_batch_size",
        str(batch),
        "--train.micro_batch_size",
        str(batch),
        "--train.device",
        device,
        "--train.steps",
        "1000",
        "--optim.lr",
        "1e-5",
        "--metrics.plot",
        "false",
        "--metrics.tensorboard",
        "false",
        "--checkpoint.resume",
        "never",
    ]
    args += shape
    if layers:
        args += ["--model.num_hidden_layers", str(layers)]
    if (device == "cuda" and compile) or (device == "cpu" and compile_cpu):
        args += ["--train.compile", "true"]
    trainer = Trainer(load_config(None, args), echo=lambda m: None)
    b = trainer.dataset.batch(list(range(batch)))

    def step():
        trainer.train_step(b)

    return trainer, step, b


def reference(case: str, b, trainer):
    from decode import hf_config_dict
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = trainer.model_config
    device = trainer.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen2Config(**hf_config_dict(c), attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    ids = b["input_ids"].to(device)
    labels = ids.clone()  # transformers shifts labels itself: the same number of predicted tokens

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads its loss every step too

    return step


def reference_compiled(case: str, b, trainer):
    """The second baseline (see the module docstring): compiled transformers with our trainer's optimizer."""
    from decode import hf_config_dict
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen15.train.optim import build_optimizer, set_lr

    device = trainer.device
    config = Qwen2Config(**hf_config_dict(trainer.model_config), attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # fp32 parameters: master weights, as ours
    model.train()
    opt = build_optimizer(model, trainer.cfg.optim)
    set_lr(opt, 1e-5)
    compiled = torch.compile(model)
    ids = b["input_ids"].to(device)
    labels = ids.clone()
    autocast = trainer.autocast  # bf16 autocast where our trainer uses it (one CUDA process)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    return step


def timed(step, device, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def run_packed(case: str, reps: int, tmp: Path, compile: bool = True, compile_cpu: bool = False) -> str:
    """Packed rows: ours keeping attention inside each document (FlexAttention on CUDA, spans of SDPA on CPU)
    against ours attending across them (plain causal SDPA) on the same rows, interleaved."""
    sides = {}
    for mask in (None, False):
        trainer, step, b = ours(case, tmp, compile, compile_cpu, packed=True, document_mask=mask)
        sides["document mask" if mask is None else "across documents"] = (trainer, step)
    device = next(iter(sides.values()))[0].device
    for _ in range(2):
        for _, step in sides.values():
            step()
    times = {name: [] for name in sides}
    for _ in range(reps):
        for name, (_, step) in sides.items():
            times[name] += timed(step, device, 1)
    tokens = b["input_ids"].numel()
    docs = int((b["document_ids"][:, 1:] != b["document_ids"][:, :-1]).sum()) + len(b["document_ids"])
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    for trainer, _ in sides.values():
        trainer.close()
    backend = next(iter(sides.values()))[0].document_backend
    return (
        f"{case} packed ({docs} documents in {len(b['input_ids'])} rows): document mask ({backend}) "
        f"{tps['document mask']:,.0f} tok/s, across documents {tps['across documents']:,.0f} tok/s, ratio "
        f"{tps['document mask'] / tps['across documents']:.2f}x"
    )


def run_case(case: str, reps: int, tmp: Path, compile: bool = True, compile_cpu: bool = False) -> dict:
    from qwen15.train.metrics import flops_per_token, peak_tflops

    trainer, ours_step, b = ours(case, tmp, compile, compile_cpu)
    steps = {"ours": ours_step, "eager": reference(case, b, trainer)}
    cuda = trainer.device.type == "cuda"
    errors = {}
    if cuda or compile_cpu:
        try:
            steps["compiled"] = reference_compiled(case, b, trainer)
        except Exception as e:  # reported in the row instead of a figure
            errors["compiled"] = f"{type(e).__name__}: {e}"
    tokens = b["input_ids"].numel()
    peaks = {}
    for _ in range(2):  # warm-up (compile, allocator)
        for name, step in list(steps.items()):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                step()
            except Exception as e:
                if name == "ours":
                    raise
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                del steps[name]
                continue
            if cuda:
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    times = {name: [] for name in steps}
    for _ in range(reps):  # interleaved so that machine noise hits every side alike
        for name, step in steps.items():
            times[name] += timed(step, trainer.device, 1)
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    row = {"case": case, "tokens": tokens, "tok_s": tps, "errors": errors}
    row["ratio"] = {name: tps["ours"] / v for name, v in tps.items() if name != "ours"}
    if cuda:  # every model lives on the device at once: each peak includes the others' resident state
        row["peak_gib"] = peaks
    peak = peak_tflops(trainer.device)
    if peak:
        fpt = flops_per_token(trainer.model_config, trainer.seq_length)
        row["mfu"] = {name: fpt * v / (peak * 1e12) for name, v in tps.items()}
    trainer.close()
    return row


def optimizer_step_times(case: str, reps: int) -> str:
    """The AdamW update alone over fp32 parameters of the case's model (gradients present): torch's fused and
    foreach kernels (our trainer builds the fused one), against the time to stream the 7 fp32 arrays it must
    touch (parameter, gradient and the two moments read; parameter and moments written) at the copy bandwidth."""
    from decode import memory_bandwidth

    from qwen15 import Qwen
    from qwen15.model_config import get_preset
    from qwen15.train.optim import param_groups

    preset, layers, _, _, device = CASES[case]
    device = torch.device(device)
    config = get_preset("tiny" if preset == "demo" else preset)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    model = Qwen.from_config(config, device=device, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for g in param_groups(model, 0.01) for p in g["params"])
    bound = 7 * 4 * numel / memory_bandwidth(device)
    parts = [f"{case}: AdamW over {numel / 1e6:,.0f}M fp32 parameters, bandwidth bound {1e3 * bound:.2f} ms"]
    for kind in ("fused", "foreach"):
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5, betas=(0.9, 0.95), **{kind: True})
        opt.step()  # creates the moments
        t = statistics.median(timed(opt.step, device, reps))
        parts.append(f"{kind} {1e3 * t:.2f} ms ({bound / t:.0%} of the bound)")
        del opt
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=list(CASES), action="append")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="CUDA case: ours eager")
    parser.add_argument(
        "--compile-cpu", action="store_true", help="CPU cases: ours with train.compile (blocks and loss)"
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="also: packed rows with document masking against the same rows attended across documents",
    )
    parser.add_argument(
        "--packed-only", action="store_true", help="only the packed comparison (see --packed)"
    )
    parser.add_argument(
        "--optimizer-only", action="store_true", help="only the AdamW update, fused vs foreach"
    )
    args = parser.parse_args()
    args.packed = args.packed or args.packed_only
    cases = args.only or [c for c in CASES if not c.startswith("cuda") or torch.cuda.is_available()]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )
    names = {
        "eager": "transformers eager + torch AdamW",
        "compiled": "transformers compiled + our fused AdamW",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if args.optimizer_only:
                print(optimizer_step_times(case, args.reps), flush=True)
                continue
            if args.packed_only:
                print(
                    run_packed(case, args.reps, Path(tmp), not args.no_compile, args.compile_cpu), flush=True
                )
                continue
            r = run_case(case, args.reps, Path(tmp), not args.no_compile, args.compile_cpu)
            parts = [f"{case}: {r['tokens']} tokens/step", f"qwen15 {r['tok_s']['ours']:,.0f} tok/s"]
            for name, label in names.items():
                if name in r["tok_s"]:
                    parts.append(f"{label} {r['tok_s'][name]:,.0f} tok/s, ratio {r['ratio'][name]:.2f}x")
                elif name in r["errors"]:
                    parts.append(f"{label}: failed ({r['errors'][name]})")
            line = " | ".join(parts)
            if "mfu" in r:
                line += ", MFU " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["mfu"].items())
            if "peak_gib" in r:
                line += ", peak GiB during step: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in r["peak_gib"].items()
                )
            print(line, flush=True)
            if args.packed:
                print(
                    run_packed(case, args.reps, Path(tmp), not args.no_compile, args.compile_cpu), flush=True
                )
    if not torch.cuda.is_available():
        print("no GPU here: the CUDA case (0.5B, seq 4096, bf16) was not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
