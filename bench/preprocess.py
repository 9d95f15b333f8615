"""Speed of `qwen15 data preprocess --type wiki` against a plain loop over transformers' tokenizer, same run.

    python bench/preprocess.py [--mb 200] [--hf-mb 50] [--workers 1 2] [--tmp /tmp/qwen15-bench]

Builds a ~200 MB WikiText file by repeating ../shared/data/wikitext2_valid.tokens.txt (kept in --tmp, never in the
repository), runs the command once per worker count (a fresh process each, as a user would), and times the seed's
procedure with transformers on the first --hf-mb of the same file: whole-file cleaning, paragraph split, one
`tokenizer(paragraph)` call per paragraph. Prints tokens/s of each, the ratio, peak memory, the projected time for
Wikitext-103 (540 MB), and checks that both produce the same ids on the part they share.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SOURCE = SHARED / "data" / "wikitext2_valid.tokens.txt"
TOKENIZER = SHARED / "tokenizer" / "qwen1.5"
WIKITEXT103_BYTES = 540 * 2**20

# Runs in a fresh process: the command's own code path, plus the process's peak memory (workers included).
RUNNER = """
import json, resource, sys
from qwen15.cli import main
code = main(sys.argv[1:])
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print(json.dumps({"code": code, "peak_rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024, "cpu_s": cpu}))
"""


def _load() -> str:
    """The machine's load average: on shared machines the wall-clock ratios move with it."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def build_input(tmp: Path, megabytes: int) -> tuple[Path, int]:
    """Whole copies of the WikiText-2 valid file (its quotes and brackets balance, so copies clean alike)."""
    data = SOURCE.read_bytes()
    copies = max(1, round(megabytes * 2**20 / len(data)))
    path = tmp / f"wiki-{copies}x.txt"
    if not path.exists() or path.stat().st_size != copies * len(data):
        with open(path, "wb") as f:
            for _ in range(copies):
                f.write(data)
    return path, copies


def run_ours(path: Path, out: Path, workers: int) -> dict:
    cmd = [
        sys.executable, "-c", RUNNER, "data", "preprocess", "--type", "wiki", "--input", str(path),
        "--tokenizer", str(TOKENIZER), "--seq-length", "2048", "--output", str(out), "--overwrite",
        "--workers", str(workers), "--quiet",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"preprocess failed:\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = json.loads((out / "meta.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": report["cpu_s"],
        "tokens": meta["stream_tokens"],
        "peak_rss_mb": report["peak_rss_mb"],
    }


def run_transformers_loop(path: Path, copies: int, hf_copies: int) -> dict:
    """The seed's procedure with transformers on the first hf_copies copies of the file."""
    from transformers import AutoTokenizer

    from qwen15.data.wikitext import clean_wikitext

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(path, encoding="utf-8") as f:
        text = f.read(len(SOURCE.read_text(encoding="utf-8")) * hf_copies)
    ids: list[int] = []
    for para in clean_wikitext(text).split("\n\n"):
        if para and not para.strip().startswith("="):
            ids += tok(para)["input_ids"]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens": len(ids),
        "bytes": SOURCE.stat().st_size * hf_copies,
        "ids": np.array(ids, np.uint32),
        "peak_rss_mb": max(rss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="size of the input to build (MB)")
    ap.add_argument("--hf-mb", type=int, default=50, help="prefix timed with the transformers loop (MB)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/qwen15-bench"))
    args = ap.parse_args()
    if not SOURCE.is_file():
        sys.exit(f"{SOURCE} is absent")
    args.tmp.mkdir(parents=True, exist_ok=True)
    path, copies = build_input(args.tmp, args.mb)
    size = path.stat().st_size
    hf_copies = min(copies, max(1, round(args.hf_mb * 2**20 / SOURCE.stat().st_size)))
    print(f"input: {path} ({size / 2**20:.0f} MB, {copies} copies of {SOURCE.name}); load {_load()}")

    ours = {}
    for w in args.workers:
        ours[w] = r = run_ours(path, args.tmp / f"out-w{w}", w)
        print(
            f"qwen15 preprocess --workers {w}: {r['tokens']:,} tokens in {r['wall_s']:.1f} s = "
            f"{r['tokens'] / r['wall_s']:,.0f} tokens/s ({size / 2**20 / r['wall_s']:.2f} MB/s); "
            f"{r['cpu_s']:.0f} CPU-s = {r['tokens'] / r['cpu_s']:,.0f} tokens per CPU-second; "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    ref = run_transformers_loop(path, copies, hf_copies)
    ref_rate = ref["tokens"] / ref["wall_s"]
    print(
        f"transformers loop on the first {ref['bytes'] / 2**20:.0f} MB ({hf_copies} copies): {ref['tokens']:,} "
        f"tokens in {ref['wall_s']:.1f} s = {ref_rate:,.0f} tokens/s; {ref['cpu_s']:.0f} CPU-s = "
        f"{ref['tokens'] / ref['cpu_s']:,.0f} tokens per CPU-second; peak RSS {ref['peak_rss_mb']:.0f} MB"
    )
    flat = np.load(args.tmp / f"out-w{args.workers[0]}" / "tokens.npy", mmap_mode="r").reshape(-1)
    shared = min(len(flat), len(ref["ids"])) - 4096  # the prefix's last paragraph may be cut differently
    same = bool(np.array_equal(flat[:shared], ref["ids"][:shared]))
    print(f"same ids as the transformers loop on the first {shared:,} tokens: {same}")
    for w, r in ours.items():
        rate = r["tokens"] / r["wall_s"]
        projected = WIKITEXT103_BYTES / (size / r["wall_s"])
        cpu_ratio = (r["tokens"] / r["cpu_s"]) / (ref["tokens"] / ref["cpu_s"])
        print(
            f"workers {w}: {rate / ref_rate:.2f}x the transformers loop in tokens/s, {cpu_ratio:.2f}x in tokens "
            f"per CPU-second; Wikitext-103 (540 MB) projected {projected / 60:.1f} min"
        )
    print(f"load at the end: {_load()}")
    print(
        f"transformers loop, Wikitext-103 projected: "
        f"{WIKITEXT103_BYTES / (ref['bytes'] / ref['wall_s']) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
