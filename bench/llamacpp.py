"""llama.cpp as a reference engine for bench/decode.py: build once, convert a checkpoint to GGUF, run llama-bench.

    python bench/llamacpp.py build          # fetch llama-cpp-python's sdist with pip, build llama-bench once
    python bench/llamacpp.py bench HF_DIR --threads 2 --prompt-len 32 --new-tokens 64

Bench-only: nothing in qwen15 imports this. The sources are those vendored in PyPI's llama-cpp-python sdist
(fetched with `pip download`), built into a cache folder outside the repository (QWEN15_BENCH_CACHE, default
~/.cache/qwen15-bench/llamacpp). The build is ggml's native one minus AMX: with AMX, llama-bench crashed on
Q8_0/Q4_0 on this CPU kind (ANCHORS.md). Conversion runs the sdist's own convert_hf_to_gguf.py with its own
vendored gguf-py on the path (it needs torch, numpy, transformers and sentencepiece-free BPE, all in our dev
venv), then llama-quantize makes Q4_0 from the bf16 file, as llama.cpp users do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN15_BENCH_CACHE", Path.home() / ".cache" / "qwen15-bench")) / "llamacpp"


def _run(cmd: list[str], quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run a command (echoed); quiet: keep its output unless it fails."""
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    if not quiet:
        return subprocess.run(cmd, check=True, **kw)
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise subprocess.CalledProcessError(done.returncode, cmd)
    return done


def source_dir() -> Path:
    """The llama.cpp sources vendored in the sdist, fetched and unpacked once."""
    root = cache_dir()
    src = root / "src"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    dl = root / "download"
    if not list(dl.glob("llama_cpp_python-*.tar.gz")):
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SDIST,
                "-d",
                str(dl),
            ]
        )
    (archive,) = dl.glob("llama_cpp_python-*.tar.gz")
    tmp = root / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(tmp, members=members, filter="data")
    (top,) = tmp.iterdir()
    (top / "vendor" / "llama.cpp").rename(src)
    shutil.rmtree(tmp)
    return src


def build() -> Path:
    """Folder holding llama-bench, llama-quantize and llama-completion (the GGUF test's generator); built once."""
    src = source_dir()
    out = cache_dir() / "build"
    bins = out / "bin"
    if all((bins / name).exists() for name in ("llama-bench", "llama-quantize", "llama-completion")):
        return bins
    _run(
        [
            "cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
            f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
        ]
    )  # fmt: skip
    _run(
        [
            "cmake",
            "--build",
            str(out),
            "--target",
            "llama-bench",
            "llama-quantize",
            "llama-completion",
            "-j",
            str(os.cpu_count()),
        ]
    )
    return bins


def convert(hf_dir: Path, kind: str, work: Path) -> Path:
    """GGUF file of hf_dir in bf16, q8_0 (convert_hf_to_gguf.py) or q4_0 (llama-quantize of the bf16 file), made
    once (written beside the target and renamed)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"model-{kind}.gguf"
    if path.exists():
        return path
    src = source_dir()
    tmp = path.with_suffix(".partial")
    if kind == "q4_0":
        bf16 = convert(hf_dir, "bf16", work)
        _run([str(build() / "llama-quantize"), str(bf16), str(tmp), "Q4_0"], quiet=True)
    else:
        script = str(src / "convert_hf_to_gguf.py")
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        _run(
            [sys.executable, script, str(hf_dir), "--outtype", kind, "--outfile", str(tmp)],
            quiet=True,
            env=env,
        )
    os.replace(tmp, path)
    return path


def bench(gguf: Path, threads: int, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    """llama-bench's prompt and decode rates (tok/s, its mean over `repeat` runs) for one GGUF file."""
    cmd = [
        str(build() / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_len),
        "-n", str(new_tokens), "-r", str(repeat), "-o", "json",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    rates = {}
    for r in rows:
        key = "prefill" if r["n_prompt"] > 0 else "decode"
        rates[key] = r["avg_ts"]
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["build", "bench"])
    p.add_argument("hf_dir", nargs="?")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    print(build())
    if args.what == "bench":
        hf = Path(args.hf_dir)
        for kind in TYPES:
            g = convert(hf, kind, hf / "gguf")
            print(kind, bench(g, args.threads, args.prompt_len, args.new_tokens, args.repeat), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
