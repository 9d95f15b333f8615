"""Peak resident memory while loading a checkpoint: qwen15 vs transformers, same random checkpoint, same run.

    python bench/load_memory.py [--preset qwen1.5-1.8b] [--dir /tmp/qwen15-load-bench]

Writes a random checkpoint of the preset's shape (bf16, sharded like the published ones) tensor by tensor, then
loads it in fresh subprocesses (so that peaks do not mix) and prints the peak added by loading over the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from qwen15 import Qwen
from qwen15.hf_checkpoint import tensor_blocks
from qwen15.hf_folder import OutTensor, hf_name, write_hf_folder
from qwen15.model_config import get_preset

PROBE = textwrap.dedent("""
    import sys, time, torch
    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    if which == "transformers":
        import transformers
    else:
        from qwen15 import Qwen
    torch.ones(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    if which == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = Qwen.from_pretrained(path, dtype=dtype)
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**20
    print(base, status_mb("VmHWM"), weights, seconds)
""")


def write_random_checkpoint(preset: str, folder: Path) -> None:
    cfg = get_preset(preset)
    if (folder / "config.json").exists():
        return
    with torch.device("meta"):
        shapes = {hf_name(k): v.shape for k, v in Qwen(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    g = torch.Generator().manual_seed(0)

    def random_blocks(shape):  # drawn tensor by tensor: the writer never holds the whole model
        return tensor_blocks((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))

    tensors = [OutTensor(n, tuple(s), "bfloat16", lambda s=s: random_blocks(s)) for n, s in shapes.items()]
    write_hf_folder(folder, cfg, tensors, max_shard_size="2GB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen1.5-1.8b")
    parser.add_argument("--dir", default="/tmp/qwen15-load-bench")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    folder = Path(args.dir) / args.preset
    t0 = time.perf_counter()
    write_random_checkpoint(args.preset, folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    print(f"checkpoint {folder} ({size:.2f} GiB, written in {time.perf_counter() - t0:.0f}s)")
    rows = []
    for which in ["qwen15"] + ([] if args.skip_reference else ["transformers"]):
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run(
                [sys.executable, "-c", PROBE, which, str(folder), dtype],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            base, peak, weights, seconds = map(float, out)
            rows.append(
                {
                    "loader": which,
                    "dtype": dtype,
                    "weights_mb": round(weights),
                    "peak_added_mb": round(peak - base),
                    "ratio": round((peak - base) / weights, 3),
                    "seconds": round(seconds, 1),
                }
            )
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
