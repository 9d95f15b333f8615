"""bench/seed_table.py: every row of the seed's published table (as SEED.md gives it) printed beside a figure
measured here (--quick: tiny shapes on CPU), and rows that do not fit the device printed as skipped with the
memory they need (--plan for a 135.8 GiB device: one H200 less the reserve)."""

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_MD = ROOT.parent / "shared" / "docs" / "SEED.md"


def table(*args: str) -> list[list[str]]:
    """The table rows bench/seed_table.py prints (run in this process: no second torch start-up)."""
    spec = importlib.util.spec_from_file_location("seed_table", ROOT / "bench" / "seed_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("seed_table", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main(list(args)) == 0
    rows = [line.strip("|").split("|") for line in out.getvalue().splitlines() if re.match(r"\| \d", line)]
    return [[c.strip() for c in row] for row in rows]


def published() -> set[tuple[str, str, int, int]]:
    """(model, phase, seq, tokens/s) of SEED.md's two performance tables."""
    if not SEED_MD.is_file():
        pytest.skip("../shared/docs/SEED.md is absent")
    out = set()
    for m in re.finditer(
        r"^\| ([\d.]+B) \| [^|]+\| [^|]+\| (\d+) \| (\w+) \| (\d+) tokens/s", SEED_MD.read_text(), re.M
    ):
        out.add((m[1], m[3], int(m[2]), int(m[4])))
    return out


def test_quick_run_measures_every_published_row():
    rows = table("--quick")
    assert {(r[0], r[1], int(r[3]), int(r[4].replace(",", ""))) for r in rows} == published()
    assert len(rows) == 16
    for r in rows:
        assert float(r[6].replace(",", "")) > 0, r


def test_rows_that_do_not_fit_are_printed_as_skipped_with_their_need():
    rows = {(r[0], r[1], int(r[3])): r for r in table("--plan", "--device", "cuda", "--memory-gib", "135.8")}
    assert len(rows) == 16
    skipped = {k for k, r in rows.items() if r[6].startswith("skipped (needs ")}
    # Training keeps fp32 weights, gradients and two AdamW moments (16 bytes a parameter): 7B is over one H200.
    assert {("7B", "finetune", 4096), ("72B", "predict", 8192), ("72B", "pretrain", 32768)} <= skipped
    assert ("0.5B", "finetune", 8192) not in skipped and ("32B", "predict", 4096) not in skipped
    for k in skipped:
        need = float(re.search(r"needs ([\d.]+) GiB", rows[k][6])[1])
        assert need > 135.8, rows[k]
