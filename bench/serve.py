"""Serving throughput and time to first token: `qwen15 serve` against `transformers serve --continuous-batching`.

    python bench/serve.py                       # CPU: 0.5B width, 4 layers, random weights; 1, 8, 32 streams
    python bench/serve.py --model DIR --streams 1 8 32 128 --device cuda

Both servers get the same model folder and the same load, one after the other, in this run: `streams` clients,
each sending streamed chat requests one after another (ShareGPT prompts from ../shared/data, each cut to
--prompt-chars), greedy, --max-tokens each, until every stream has sent --requests-per-stream. Reported per
system and level: output tokens/s over the wall time of the level, and time to first token (request sent to first
content) at p50 and p99. qwen15 runs with --no-prefix-reuse so that neither reuses prompts across requests.
Both servers get the same --dtype, given explicitly (default fp32, qwen15's default on CPU; bf16 is the dtype
Qwen1.5's checkpoints are published in; the random model is saved in it too), the same number of CPU threads
(--threads, default torch's choice here: qwen15's --threads, transformers' OMP_NUM_THREADS) and a warm-up request.
Where `transformers serve` cannot run, the reference is a loop of sequential `qwen15 generate` calls (one model
load, then one request at a time through the library).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QWEN15_SHARED", ROOT.parent / "shared"))


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # ours -> transformers' names


def bench_model(folder: Path, layers: int, dtype: str = "fp32") -> Path:
    """The 0.5B shape (hidden 1024, 16 heads, tied 151936 vocabulary) with `layers` layers, random weights."""
    import torch

    from qwen15 import Qwen, Tokenizer, get_preset

    cfg = get_preset("qwen1.5-0.5b").replace(num_hidden_layers=layers)
    Qwen.from_config(cfg, seed=0, dtype=getattr(torch, DTYPES[dtype])).save_pretrained(
        str(folder),
        tokenizer=Tokenizer.from_pretrained(SHARED / "tokenizer" / "qwen1.5"),
        generation_config={"eos_token_id": [151645, 151643], "do_sample": False},
    )
    return folder


def sharegpt_prompts(chars: int) -> list[str]:
    out = []
    for name in ("sharegpt_singleturn_50.json", "sharegpt_multiturn_8conv.json"):
        for item in json.loads((SHARED / "data" / name).read_text()):
            text = item.get("prompt") or next(
                (c["value"] for c in item.get("conversations", []) if c.get("from") == "human"), ""
            )
            if text.strip():
                out.append(text[:chars])
    return out


def start(cmd: list[str], ready: str, env=None, timeout: float = 600) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(ready, line):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not seen.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(lines[-30:]))
    return proc, lines


def stream_one(host: str, body: dict) -> tuple[float | None, int]:
    """(seconds to the first content, completion tokens) of one streamed chat request."""
    conn = http.client.HTTPConnection(host, timeout=3600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
    first, chunks, usage = None, 0, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            usage = data["usage"]["completion_tokens"]
        for c in data.get("choices", []):
            if (c.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - sent
    conn.close()
    return first, usage if usage is not None else chunks


def load(host: str, model: str, prompts: list[str], streams: int, per_stream: int, max_tokens: int) -> dict:
    def worker(w: int):
        out = []
        for r in range(per_stream):
            text = prompts[(w * per_stream + r) % len(prompts)]
            body = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            out.append(stream_one(host, body))
        return out

    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = [r for rs in pool.map(worker, range(streams)) for r in rs]
    wall = time.perf_counter() - t
    ttft = sorted(f for f, _ in results if f is not None)
    tokens = sum(n for _, n in results)
    return {
        "streams": streams,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft) if ttft else None,
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
    }


def warm(host: str, model: str) -> None:
    stream_one(host, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def sequential_generate(folder: str, prompts: list[str], args) -> list[dict]:
    """The fallback reference: one request at a time through `qwen15 generate`'s library path."""
    import torch

    from qwen15 import Qwen, Tokenizer, generate, prepare_for_inference

    model = prepare_for_inference(Qwen.from_pretrained(folder, dtype=getattr(torch, DTYPES[args.dtype])))
    tok = Tokenizer.from_pretrained(folder)
    n = args.requests_per_stream * max(args.streams)
    t, tokens, ttft = time.perf_counter(), 0, []
    for i in range(n):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompts[i % len(prompts)]}], add_generation_prompt=True
        )
        s = time.perf_counter()
        out = generate(model, tok, ids, max_new_tokens=args.max_tokens, temperature=0)
        ttft.append(time.perf_counter() - s)  # whole request: the loop answers one at a time
        tokens += len(out.token_ids)
    wall = time.perf_counter() - t
    return [
        {
            "system": "sequential qwen15 generate",
            "streams": 1,
            "requests": n,
            "tokens": tokens,
            "seconds": wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50": statistics.median(ttft),
            "ttft_p99": max(ttft),
        }
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (default: the 0.5B shape with --layers layers, random)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=600)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="both servers compute in it")
    p.add_argument("--threads", type=int, help="CPU threads of each server (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each level per system (the best counts)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    import torch

    threads = args.threads or torch.get_num_threads()
    folder = Path(args.model) if args.model else bench_model(tmp / "qwen1.5-0.5b-4l", args.layers, args.dtype)
    prompts = sharegpt_prompts(args.prompt_chars)
    port = 18431
    cmd = [sys.executable, "-m", "qwen15.cli", "serve", "--model", str(folder), "--port", str(port)]
    cmd += ["--device", args.device, "--max-num-seqs", str(max(args.streams)), "--max-model-len", "1024"]
    cmd += ["--kv-cache-memory", "8GiB", "--no-prefix-reuse", "--max-queue", "1024"]
    cmd += ["--dtype", args.dtype, "--threads", str(threads)]
    systems = {"qwen15 serve": (cmd, r"serving .* on http", f"127.0.0.1:{port}", folder.name, None)}
    tf = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    if not args.skip_transformers and Path(tf).exists():
        cmd = [
            tf,
            "serve",
            str(folder),
            "--continuous-batching",
            "--device",
            args.device,
            "--dtype",
            DTYPES[args.dtype],
            "--port",
            str(port + 1),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        systems["transformers serve --continuous-batching"] = (
            cmd,
            r"Uvicorn running",
            f"localhost:{port + 1}",
            str(folder),
            env,
        )
    procs, rows = [], []
    try:
        live = {}
        for name, (cmd, ready, host, model, env) in systems.items():
            try:
                procs.append(start(cmd, ready, env=env)[0])
                warm(host, model)
                live[name] = (host, model)
            except RuntimeError as e:
                print(f"{name} did not run: {e}", file=sys.stderr)
        # the systems take turns at each level (best of --repeats), so that the load of a shared machine
        # falls on both alike
        for n in args.streams:
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for name, (host, model) in live.items():
                    row = load(host, model, prompts, n, args.requests_per_stream, args.max_tokens)
                    row["system"] = name
                    print(json.dumps(row), flush=True)
                    if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                        best[name] = row
            rows += best.values()
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if len(live) < 2:
        rows += sequential_generate(str(folder), prompts, args)

    print("\n| system | streams | requests | output tokens | tokens/s | TTFT p50 (s) | TTFT p99 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['system']} | {r['streams']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
            f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} |"
        )
    ours = {r["streams"]: r["tokens_per_s"] for r in rows if r["system"] == "qwen15 serve"}
    ref = {r["streams"]: r["tokens_per_s"] for r in rows if r["system"] != "qwen15 serve"}
    if len(ours) > 1:
        print(f"\nqwen15 at {max(ours)} streams / 1 stream: {ours[max(ours)] / ours[min(ours)]:.2f}x")
    for n in sorted(set(ours) & set(ref)):
        print(f"qwen15 / reference at {n} streams: {ours[n] / ref[n]:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
