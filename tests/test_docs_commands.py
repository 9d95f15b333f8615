"""Every command shown in README.md and docs/*.md runs: the fenced shell blocks are read from the files (so a command
added to the docs is run here too), the self-contained Python blocks are executed, and a few commands written in the
prose are listed below (their text is checked to be still in the docs).

They run in a folder of stand-ins: model folders named as in the docs (Qwen1.5-0.5B-Chat, Qwen1.5-7B, ...) holding
tiny random models with a 300-token byte-level BPE tokenizer, and small data files named as in the docs
(alpaca_data.json, wiki.train.tokens, ...). What is mapped, and why:
  - `torchrun --nproc-per-node 8` (or 4) starts 2 processes: the machine has 2 CPU cores; the recipe's layout is
    checked against the processes actually started (the tp 2 x pp 2 example keeps its 4). A free --master-port is
    added so that parallel test runs do not collide.
  - training commands get `--train.steps 1` (2 for the tiny recipe, which warms up over 2); the GPU recipes also `--train.device cpu --train.dtype float32
    --optim.warmup_steps 0` and a global batch of one micro-batch per process: the commands are checked to run,
    not to train (one step of a recipe's 64 rows of 4096 tokens takes minutes on 2 cores; the recipes' batch
    arithmetic for the GPUs they are written for is checked by test_every_shipped_recipe_parses_and_validates).
    The tiny recipe keeps its batch sizes.
  - `qwen15 demo` runs with `--quick` (the full demo takes minutes; test_demo.py runs the same stages).
  - placeholders DATASET, TOKENIZER_DIR and CKPT name stand-ins.
  - client examples (curl, the openai package) of a document that shows http://127.0.0.1:8000 talk to a
    `qwen15 serve` of the Qwen1.5-0.5B-Chat stand-in started for that document on a free port (the address in the
    examples is replaced by the server's).
  - `qwen15 serve` (also under torchrun) starts as a subprocess on a free port (the docs' --port is replaced, a GPU-sized
    --kv-cache-memory becomes 64MiB); it counts as run when its /v1/models answers; then it is stopped.
docs/migrate.md is run by test_migrate_doc.py, on the MindSpore fixtures. Not run here: installation lines (.ci/run runs them on a fresh machine), `pytest` (this suite), and commands for
several machines or SLURM (test_multinode.py runs the same torchrun flags as two launchers on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import reliability_fixtures as fx

from qwen15.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# docs/migrate.md's commands need MindSpore files: test_migrate_doc.py runs them on the MindSpore fixtures
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "migrate.md")]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
MODELS = ["Qwen1.5-0.5B-Chat", "Qwen1.5-0.5B", "Qwen1.5-7B", "Qwen1.5-7B-Chat", "Qwen1.5-72B-Chat"]
NOT_RUN = {  # part of a command -> why it is not run here
    "pip install": "installation: .ci/run runs it word for word on a fresh machine",
    "--nnodes": "several machines: test_multinode.py runs these torchrun flags as two launchers on 127.0.0.1",
    "srun ": "SLURM: as above",
    "export MASTER_ADDR": "a SLURM job script line",
    "export MASTER_PORT": "a SLURM job script line",
    "export OMP_NUM_THREADS": "a SLURM job script line",
}
# Commands written in the prose: (file, the text as it stands there, the command run)
# run after that document's fenced commands, in the same folder (the chat uses the model the demo wrote)
INLINE = [
    ("training.md", "`torchrun --standalone --nproc-per-node 2 -m qwen15.cli train --config tiny ...`",
     "torchrun --standalone --nproc-per-node 2 -m qwen15.cli train --config tiny --data.path DATASET"),
    ("training.md", "Afterwards: `qwen15 chat --model runs/demo/model`", "qwen15 chat --model runs/demo/model"),
    ("README.md", "`torchrun --nproc-per-node 4 -m qwen15.cli chat --model Qwen1.5-72B-Chat\n--predict-data \"你好\"`",
     'torchrun --nproc-per-node 4 -m qwen15.cli chat --model Qwen1.5-72B-Chat --predict-data "你好"'),
]  # fmt: skip
# Python blocks that are fragments of a larger program (names defined elsewhere): not executable alone.
FRAGMENTS = ("expected_fingerprint=tokenizer.fingerprint", "init_inference_mesh()", "apply_tensor_parallel")


def shell_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) of every fenced bash block, continuation lines joined, comment lines dropped."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("bash", "sh"):
            continue
        first = text[: m.start()].count("\n") + 2
        joined, start = "", None
        for i, line in enumerate(m.group(2).splitlines()):
            if not joined and (not line.strip() or line.lstrip().startswith("#")):
                continue
            start = first + i if not joined else start
            joined += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                out.append((start, joined.strip()))
                joined = ""
    return out


def python_blocks(text: str) -> list[tuple[int, str]]:
    return [
        (text[: m.start()].count("\n") + 2, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == "python" and not any(f in m.group(2) for f in FRAGMENTS)
    ]


# ---------------------------------------------------------------------------------------------- stand-ins


def _wiki_text(n_articles: int) -> str:
    body = []
    for a in range(n_articles):
        body.append(f" = Article {a} = \n\n")
        for p in range(6):
            body.append(" " + " ".join(fx.TEXTS[(a + p) % 4].split()[: 20 + p]) + f" ( {a} @,@ {p} ) . \n\n")
        body.append(f" = = Section {a} = = \n\n {fx.TEXTS[a % 4]} \n\n")
    return "".join(body)


def _answer_at_once(folder: Path, tok) -> None:
    """Make a stand-in end every reply at its first token (<|im_end|> or <|endoftext|>, both stop a chat reply): the
    final norm keeps one dimension, and only those two rows of the (tied) output layer read it, with opposite signs.
    A random model would otherwise run to --max-new-tokens (512) on every question, minutes of decoding here."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    w = load_file(str(path))
    w["model.norm.weight"].zero_()[0] = 1.0
    emb = w["model.embed_tokens.weight"]
    emb[tok.im_end_id].zero_()[0] = 1e4
    emb[tok.endoftext_id].zero_()[0] = -1e4
    for i in range(emb.shape[0]):
        if i not in (tok.im_end_id, tok.endoftext_id):
            emb[i, 0] = 0.0
    save_file({k: v.contiguous() for k, v in w.items()}, str(path), metadata={"format": "pt"})
    assert torch.isfinite(emb).all()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    world = tmp_path_factory.mktemp("docs") / "world"
    world.mkdir()
    tok = fx.tokenizer()
    tok.save_pretrained(world / "tokenizer")
    for name in MODELS:
        fx.save_model(world / name, tok, vocab_size=320, max_positions=8192)
        _answer_at_once(world / name, tok)
    (world / "wiki.test.raw").write_text(_wiki_text(3))
    (world / "wiki.train.tokens").write_text(_wiki_text(300))
    records = [
        {
            "instruction": f"Add {a} and {a + 1}.",
            "input": "" if a % 2 else f"{a} {a + 1}",
            "output": str(2 * a + 1),
        }
        for a in range(400)
    ]
    (world / "alpaca_data.json").write_text(json.dumps(records))
    share = [
        {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": fx.TEXTS[i % 4]}]}
        for i in range(30)
    ]
    share.append({"conversations": [{"from": "robot", "value": "a bad record, skipped with --skip-bad"}]})
    (world / "sharegpt.json").write_text(json.dumps(share))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "alpaca-to-chat", "--input", str(world / "alpaca_data.json"),
                     "--output", str(world / "alpaca-chat.jsonl")]) == 0  # fmt: skip
        assert main(["data", "preprocess", "--type", "wiki", "--input", str(world / "wiki.train.tokens"), "--tokenizer",
                     str(world / "tokenizer"), "--seq-length", "128", "--output", str(world / "data" / "wikitext2-128"),
                     "--quiet"]) == 0  # fmt: skip
    shutil.copytree(ROOT / "configs", world / "configs")
    return world


@pytest.fixture
def world(template, tmp_path, request):
    """A copy of the stand-ins; files that the document's own commands write are left for them to write."""
    here = tmp_path / "world"
    shutil.copytree(template, here)
    doc = request.node.callspec.params["doc"]
    if doc:
        text = next(p for p in DOCS if p.name == doc).read_text(encoding="utf-8")
        for f in sorted(here.iterdir()):
            if f.is_file() and f"--output {f.name}" in text:
                f.unlink()
    return here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapt(command: str) -> tuple[list[str], str | None]:
    """The command as run here (see the module docstring), and the text piped into it."""
    stdin = None
    m = re.match(r'echo "([^"]*)" \| (.*)', command)
    if m:
        stdin, command = m.group(1) + "\n", m.group(2)
    words = shlex.split(command, comments=True)
    subs = {"DATASET": "data/wikitext2-128", "TOKENIZER_DIR": "tokenizer",
            "CKPT": "runs/finetune_7b/checkpoints/step-00000001"}  # fmt: skip
    words = [subs.get(w, w) for w in words]
    if words[0] == "torchrun":
        i = words.index("--nproc-per-node")
        keep4 = "--parallel.pp" in words  # tp 2 x pp 2 needs its four processes
        words[i + 1] = words[i + 1] if keep4 else str(min(int(words[i + 1]), 2))
        if "--standalone" not in words:
            words[1:1] = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    if "train" in words:
        recipe = words[words.index("--config") + 1] if "--config" in words else ""
        gpu = recipe.startswith("configs/")
        steps = "1" if gpu else "2"  # the tiny recipe warms up over 2 steps
        words += ["--train.steps", steps, "--metrics.plot", "false", "--metrics.tensorboard", "false"]
        if gpu:
            from qwen15.train.config import load_config

            micro = load_config(Path(ROOT / recipe)).train.micro_batch_size
            procs = int(words[words.index("--nproc-per-node") + 1]) if "--nproc-per-node" in words else 1
            words += ["--train.device", "cpu", "--train.dtype", "float32", "--optim.warmup_steps", "0",
                      "--train.global_batch_size", str(micro * procs)]  # fmt: skip
    if words[:2] == ["qwen15", "demo"] and "--quick" not in words:
        words.append("--quick")
    if words[:2] == ["qwen15", "chat"] and "--predict-data" not in words and "--run-demo" not in words:
        stdin = stdin or "hello\n/exit\n"  # the interactive chat, answered once
    return words, stdin


def serve(words: list[str], cwd: Path) -> tuple[int, str]:
    """`qwen15 serve` (or `torchrun ... -m qwen15.cli serve`): started as a subprocess on a free port, asked for its
    models once it listens (within 5 minutes), stopped."""
    import threading
    import urllib.request

    i = words.index("serve")
    launcher = (
        [sys.executable, "-m", "qwen15.cli"]
        if words[0] == "qwen15"
        else [sys.executable, "-m", "torch.distributed.run", *words[1:i]]
    )
    rest = words[i + 1 :]
    args = [w for j, w in enumerate(rest) if w != "--port" and (j == 0 or rest[j - 1] != "--port")]
    if "--kv-cache-memory" in args:  # the docs size it for a GPU; here a stand-in model on CPU
        args[args.index("--kv-cache-memory") + 1] = "64MiB"
    proc = subprocess.Popen(
        [*launcher, "serve", *args, "--port", "0"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    timer = threading.Timer(300, proc.kill)
    timer.start()
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"on (http://\S+) ", line)
            if m:
                url = m.group(1).replace("0.0.0.0", "127.0.0.1")
                key = args[args.index("--api-key") + 1] if "--api-key" in args else None
                request = urllib.request.Request(url + "/v1/models")
                if key:
                    request.add_header("Authorization", f"Bearer {key}")
                with urllib.request.urlopen(request, timeout=60) as r:
                    answer = json.loads(r.read())
                lines.append(f"GET /v1/models -> {[m['id'] for m in answer['data']]}\n")
                return 0, "".join(lines)
        return proc.wait() or 1, "".join(lines)
    finally:
        timer.cancel()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def client_server(text: str, cwd: Path):
    """For a document whose client examples talk to http://127.0.0.1:8000: a `qwen15 serve` of Qwen1.5-0.5B-Chat on a
    free port while its commands and Python blocks run; yields the replacement of "127.0.0.1:8000" (or None)."""
    if "127.0.0.1:8000" not in text:
        yield None
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen15.cli", "serve", "--model", "Qwen1.5-0.5B-Chat", "--port", "0"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            m = re.search(r"on http://(\S+) ", line)
            if m:
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
                yield m.group(1)
                return
        raise AssertionError("the server for the client examples did not start")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run(words: list[str], stdin: str | None, cwd: Path) -> tuple[int, str]:
    """In this process for `qwen15 ...` (through qwen15.cli.main), as a subprocess for torchrun and serve."""
    if "serve" in words[:2] or words[:1] == ["torchrun"] and "serve" in words:
        return serve(words, cwd)
    if words[0] == "curl":
        proc = subprocess.run(["curl", "-sS", "--fail", "--max-time", "120", *words[1:]], cwd=cwd,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr
    if words[0] == "torchrun":
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *words[1:]],
            cwd=cwd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        return proc.returncode, proc.stdout + proc.stderr
    out, old_cwd, old_stdin = io.StringIO(), os.getcwd(), sys.stdin
    os.chdir(cwd)
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(words[1:])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(old_cwd)
        sys.stdin = old_stdin
    return code, out.getvalue()


def _run_all(commands: list[tuple[str, str]], cwd: Path) -> list[str]:
    failures = []
    for where, command in commands:
        skip = next((why for part, why in NOT_RUN.items() if part in command), None)
        if skip or command.strip() == "pytest" or command.endswith("&& pytest"):
            print(f"not run: {where}: {command[:80]} ({skip or 'the test suite itself'})")
            continue
        words, stdin = adapt(command)
        t = time.perf_counter()
        code, output = run(words, stdin, cwd)
        print(f"\nran {where}: {' '.join(words)[:120]} -> {code} in {time.perf_counter() - t:.1f}s")
        if code != 0 or "Traceback" in output:
            errors = "\n".join(line for line in output.splitlines() if "error:" in line)
            failures.append(
                f"{where}: {command}\n  ran: {shlex.join(words)}\n  exit {code}: {errors or output[-1500:]}"
            )
    return failures


@pytest.mark.parametrize("doc", [p.name for p in DOCS])
def test_the_commands_of_each_document_run(world, doc):
    path = next(p for p in DOCS if p.name == doc)
    text = path.read_text(encoding="utf-8")
    commands = [(f"{doc}:{line}", c) for line, c in shell_commands(text)]
    for file, prose, command in INLINE:
        if file == doc:
            assert prose in text, f"{doc} no longer says {prose}: update INLINE"
            commands.append((f"{doc} (prose)", command))
    with client_server(text, world) as hostport:
        here = (lambda t: t.replace("127.0.0.1:8000", hostport)) if hostport else (lambda t: t)
        failures = _run_all([(where, here(c)) for where, c in commands], world)
        for line, code in python_blocks(text):
            old = os.getcwd()
            os.chdir(world)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(here(code), f"{doc}:{line}", "exec"), {"__name__": "__docs__"})
                print(f"\nran {doc}:{line} (python)")
            except Exception as e:  # a failing example is reported with the others
                failures.append(f"{doc}:{line} (python): {type(e).__name__}: {e}")
            finally:
                os.chdir(old)
    assert not failures, "\n".join(failures)
