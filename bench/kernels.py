"""Matrix products alone, at decode shapes: GB/s of weights read per format, against the memory's read bandwidth.

    python bench/kernels.py                      # qwen1.5-0.5b shapes, batch 1, bf16 / int8 / int4
    python bench/kernels.py --batch 1 8 --formats bf16 bf16-onednn int4   # bf16-onednn: oneDNN's packed product
    python bench/kernels.py --batch 1 8 32 --formats bf16 bf16-avx512 bf16-onednn   # AMX / AVX-512 / oneDNN
    python bench/kernels.py --batch 8 32 64 256 --formats fp32 fp32-torch fp32-onednn  # ours / torch (MKL) / packed

One "sweep" is what a decode step multiplies: every layer's fused q/k/v, o, gate/up and down matrix (separate
tensors per layer, as in the model, so that nothing stays in cache) and the output layer; activations are random
rows in the format's dtype (`-torch`: nn.Linear itself, what an unprepared model and transformers run). Reported per matrix kind: ms per sweep and weight GB/s; for the sweep: the share of the read bandwidth
(all threads summing a 512 MiB buffer, measured in the same run). Less sensitive to a shared machine than tok/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qwen15.model_config import PRESETS
from qwen15.quantize import kernels
from qwen15.quantize.cpu import PackedLinear
from qwen15.quantize.int4 import Int4Linear
from qwen15.quantize.int8 import Int8Linear


def shapes(preset: str) -> dict[str, tuple[int, int, int]]:
    """name -> (out, in, count per sweep) for the preset's decode step (fused projections)."""
    c = PRESETS[preset]
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return {
        "qkv": (h + 2 * kv, h, n),
        "o": (h, h, n),
        "gate_up": (2 * i, h, n),
        "down": (h, i, n),
        "lm_head": (c.vocab_size, h, 1),
    }


FORMATS = [
    "bf16",
    "bf16-avx512",
    "bf16-onednn",
    "bf16-torch",
    "fp32",
    "fp32-torch",
    "fp32-onednn",
    "int8",
    "int4",
]


def make(fmt: str, out: int, inp: int, group: int) -> nn.Module:
    lin = nn.Linear(inp, out, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    lin = lin.to(torch.float32 if fmt.startswith("fp32") else torch.bfloat16).requires_grad_(False)
    # what PackedLinear picks here: AMX at 2-64 rows where the CPU has it, else AVX-512
    if fmt in ("bf16", "fp32"):
        return PackedLinear(lin)
    # our AVX-512 kernels alone (dot products, broadcasts from 24 rows), as without AMX
    if fmt == "bf16-avx512":
        mod = PackedLinear(lin)
        mod.amx = False
        return mod
    if fmt.endswith("-onednn"):  # oneDNN's product on its prepacked weight (PackedLinear without kernels)
        mod = PackedLinear(lin)
        mod.kernel, mod.weight = False, torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 1)
        return mod
    if fmt.endswith("-torch"):
        return lin
    if fmt == "int8":
        return Int8Linear.from_linear(lin)
    return Int4Linear.from_linear(lin, group)


def nbytes(mod: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in [*mod.buffers(), *mod.parameters()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen1.5-0.5b")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["bf16", "int8", "int4"],
        choices=FORMATS,
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7, help="sweeps per figure (median)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    read = kernels.read_bandwidth()
    print(f"# kernels: {args.preset}, {args.threads} threads, read bandwidth {read / 1e9:.1f} GB/s")
    print(
        "| format | batch | "
        + " | ".join(f"{k} ms (GB/s)" for k in shapes(args.preset))
        + " | sweep ms | share of read bw |"
    )
    print("| --- | --- |" + " --- |" * (len(shapes(args.preset)) + 2))
    # every format's matrices at once, and the formats alternated within each round: this VM's bandwidth moves
    # within a run, so one format after another would compare different machines
    mats = {
        fmt: {
            k: [make(fmt, o, i, args.group) for _ in range(n)] for k, (o, i, n) in shapes(args.preset).items()
        }
        for fmt in args.formats
    }
    for m in args.batch:
        xs = {
            dt: {k: torch.randn(1, m, i).to(dt) for k, (o, i, n) in shapes(args.preset).items()}
            for dt in (torch.bfloat16, torch.float32)
        }
        per = {fmt: {k: [] for k in mats[fmt]} for fmt in args.formats}
        with torch.inference_mode():
            for r in range(args.repeat + 1):
                for fmt in args.formats:
                    x = xs[torch.float32 if fmt.startswith("fp32") else torch.bfloat16]
                    for k, mods in mats[fmt].items():
                        t = time.perf_counter()
                        for mod in mods:
                            mod(x[k])
                        if r:
                            per[fmt][k].append(time.perf_counter() - t)
        for fmt in args.formats:
            cells, total_t, total_b = [], 0.0, 0
            for k, mods in mats[fmt].items():
                t = statistics.median(per[fmt][k])
                b = sum(nbytes(mod) for mod in mods)
                total_t, total_b = total_t + t, total_b + b
                cells.append(f"{t * 1e3:.2f} ({b / t / 1e9:.1f})")
            share = total_b / total_t / read
            print(f"| {fmt} | {m} | " + " | ".join(cells) + f" | {total_t * 1e3:.1f} | {share:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
