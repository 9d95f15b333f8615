"""MindFormers .ckpt -> Hugging Face folder: qwen15 (streamed, no MindSpore) vs the seed's way (MindSpore's
load_checkpoint of the whole file, rename, save), wall time and peak memory, in the same run.

    python bench/migrate.py --mindspore-python /path/to/venv-with-mindspore/bin/python [--repeat 2]

Writes a random checkpoint of the Qwen1.5-0.5B shape in fp16 as the seed's convert_weight.py does (unfused
MindFormers names, tied embedding, no lm_head; written by qwen15's writer, which test_mindspore_ckpt.py shows
byte-identical to save_checkpoint), then converts it in fresh subprocesses measured by /usr/bin/time (peak RSS,
wall), alternating the two sides, and checks that both outputs hold the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from qwen15.mindspore import names
from qwen15.mindspore.ckpt import CkptWriter
from qwen15.model_config import get_preset

# The seed's way (research/qwen1_5/convert_reversed.py: load_checkpoint, rename, save), saving safetensors rather
# than its torch.save pickle so that both sides write the same kind of folder.
SEED = textwrap.dedent(
    """
    import sys, mindspore as ms
    from safetensors.numpy import save_file
    RENAMES = [("tok_embeddings.embedding_weight", "embed_tokens.weight"), (".attention.wq.", ".self_attn.q_proj."),
        (".attention.wk.", ".self_attn.k_proj."), (".attention.wv.", ".self_attn.v_proj."),
        (".attention.wo.", ".self_attn.o_proj."), (".feed_forward.w1.", ".mlp.gate_proj."),
        (".feed_forward.w2.", ".mlp.down_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
        (".attention_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
        (".norm_out.", ".norm.")]
    params = ms.load_checkpoint(sys.argv[1])
    state = {}
    for name, value in params.items():
        for a, b in RENAMES:
            name = name.replace(a, b)
        state[name] = value.asnumpy()
    save_file(state, sys.argv[2], metadata={"format": "pt"})
    """
)


def write_checkpoint(path: Path, seed: int = 0) -> int:
    cfg = get_preset("qwen1.5-0.5b")
    rng = np.random.default_rng(seed)
    with CkptWriter(path) as w:
        for name, shape in names.mindformers_shapes(cfg).items():
            w.add(name, "float16", shape, [rng.standard_normal(shape, np.float32).astype(np.float16)])
    return path.stat().st_size


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `cmd` in a fresh process."""
    run = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{run.stderr[-3000:]}")
    wall, kb = run.stderr.strip().splitlines()[-1].split()[1:]
    return float(wall), int(kb) / 1024


def same_tensors(ours: Path, seed: Path) -> bool:
    from safetensors import safe_open

    with safe_open(ours, "pt") as a, safe_open(seed, "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return False
        return all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mindspore-python", default=os.environ.get("QWEN15_MINDSPORE_PYTHON"), required=False)
    p.add_argument("--dir", type=Path, default=Path("/tmp/qwen15-migrate-bench"))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    if not args.mindspore_python:
        raise SystemExit(
            "pass --mindspore-python (a Python with mindspore installed) or set QWEN15_MINDSPORE_PYTHON"
        )
    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.dir / "qwen1_5_0_5b_fp16.ckpt"
    if not ckpt.exists():
        t = time.perf_counter()
        write_checkpoint(ckpt)
        print(f"wrote {ckpt} in {time.perf_counter() - t:.0f} s")
    size_mib = ckpt.stat().st_size / 2**20
    config = args.dir / "config.json"
    config.write_text(json.dumps(get_preset("qwen1.5-0.5b").to_hf_dict()))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GLOG_v": "3"}
    ours_cmd = [sys.executable, "-m", "qwen15.cli", "convert", "--from", "mindspore", str(ckpt), str(args.dir / "ours"),
                "--config", str(config), "--overwrite", "--quiet"]  # fmt: skip
    seed_out = args.dir / "seed.safetensors"
    seed_cmd = [args.mindspore_python, "-c", SEED, str(ckpt), str(seed_out)]
    rows = {"qwen15": [], "mindspore": []}
    for _ in range(args.repeat):
        rows["qwen15"].append(timed(ours_cmd, env))
        rows["mindspore"].append(timed(seed_cmd, env))
    assert same_tensors(args.dir / "ours" / "model.safetensors", seed_out), "the two outputs differ"
    print(f"checkpoint: {size_mib:,.0f} MiB (Qwen1.5-0.5B shape, fp16); outputs hold identical tensors")
    print("| converter | wall s (each run) | peak RSS MiB (each run) | peak / checkpoint |")
    print("| --- | --- | --- | --- |")
    for who, runs in rows.items():
        walls = " / ".join(f"{w:.1f}" for w, _ in runs)
        peaks = " / ".join(f"{m:,.0f}" for _, m in runs)
        print(f"| {who} | {walls} | {peaks} | {min(m for _, m in runs) / size_mib:.2f} |")
    w_ours, w_ms = min(w for w, _ in rows["qwen15"]), min(w for w, _ in rows["mindspore"])
    m_ours, m_ms = min(m for _, m in rows["qwen15"]), min(m for _, m in rows["mindspore"])
    print(
        f"qwen15 / mindspore (best of {args.repeat}): wall {w_ours / w_ms:.2f}x, peak memory {m_ours / m_ms:.2f}x"
    )


if __name__ == "__main__":
    main()
