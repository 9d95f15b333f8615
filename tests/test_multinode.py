"""Two nodes the way a cluster runs them, on one machine: two torchrun launchers (`--nnodes 2 --node-rank 0|1
--master-addr 127.0.0.1`, 2 processes each, gloo) sharing one run directory. The losses equal the single-process
run's, each checkpoint is written once (not once per node), a resume on one node continues the run, and killing
one node's launcher stops every worker of both nodes within a bounded time, with a message (no hang)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_fixtures as fx

from qwen15.cli import main

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(args: list[str], port: int, log: Path) -> list[subprocess.Popen]:
    procs = []
    for node in (0, 1):
        command = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "qwen15.cli", *args]  # fmt: skip
        out = open(log.with_suffix(f".node{node}.log"), "w")  # noqa: SIM115 (closed by the caller's wait)
        procs.append(
            subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")
            )
        )
    return procs


def workers_of(launcher: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{launcher}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(c) for c in children]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return fx.artifacts(tmp_path_factory.mktemp("nodes"), rows=80)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_launchers_train_like_two_nodes_and_one_node_resumes(art, tmp_path):
    from train_helpers import checkpoint_weights

    common = dict(train__steps=4, train__global_batch_size=8, train__micro_batch_size=2, checkpoint__every=2)
    single = tmp_path / "single"
    assert main(["train", *fx.train_overrides(art["data"], single, art["tok"], art["vocab"], **common)]) == 0
    run = tmp_path / "run"
    args = [
        "train",
        *fx.train_overrides(art["data"], run, art["tok"], art["vocab"], **common, train__stop_at=2),
    ]
    nodes = launch_nodes(args, free_port(), tmp_path / "two")
    codes = [p.wait(timeout=600) for p in nodes]
    logs = [(tmp_path / f"two.node{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], logs
    assert "4 process(es)" in logs[0]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # once, not once per node
    assert sorted(p.name for p in (ckpts / "step-00000002" / "rng").iterdir()) == [
        f"rank-{r:05d}.safetensors" for r in range(4)
    ]
    assert json.loads((ckpts / "step-00000002" / "trainer_state.json").read_text())["world_size"] == 4
    assert losses(run) == pytest.approx(losses(single)[:2], rel=1e-5)
    # the rest on one node (one process): resharded, and the run ends where the single-process run ended
    assert main(["train", *fx.train_overrides(art["data"], run, art["tok"], art["vocab"], **common)]) == 0
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
    a = checkpoint_weights(ckpts / "step-00000004")
    b = checkpoint_weights(single / "checkpoints" / "step-00000004")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_killing_one_nodes_launcher_stops_both_nodes(art, tmp_path):
    run = tmp_path / "run"
    args = ["train", *fx.train_overrides(art["data"], run, art["tok"], art["vocab"], train__steps=100000,
                                         train__global_batch_size=8, checkpoint__every=0)]  # fmt: skip
    nodes = launch_nodes(args, free_port(), tmp_path / "kill")
    try:
        deadline = time.monotonic() + 600
        while not ((run / "metrics.jsonl").is_file() and len(losses(run)) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in nodes)
            time.sleep(0.2)
        workers = workers_of(nodes[0].pid) + workers_of(nodes[1].pid)
        assert len(workers) == 4
        killed_at = time.monotonic()
        os.kill(nodes[1].pid, signal.SIGKILL)
        code = nodes[0].wait(timeout=120)  # the other node stops on its own
        while any(alive(w) for w in workers) and time.monotonic() - killed_at < 60:
            time.sleep(0.2)
        stopped_after = time.monotonic() - killed_at
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert not [w for w in workers if alive(w)], "workers left running"
    assert code != 0 and stopped_after < 60
    log0 = (tmp_path / "kill.node0.log").read_text()
    log1 = (tmp_path / "kill.node1.log").read_text()
    assert "the torchrun launcher" in log1 and "is gone" in log1
    assert "lost contact with other training processes" in log0, log0[-3000:]
