"""Run each equivalence test N times in fresh pytest processes; print pass counts and the measured differences.

    python tests/repeat_equivalence.py                 # every equivalence test below, 20 times each
    python tests/repeat_equivalence.py -n 5 tests/test_train.py::test_single_process_equals_the_reference_loop

Not collected by pytest (the name does not start with test_): it is how the tolerances of
test_train_helpers.assert_matches_reference were set and how their stability is shown (issue 19). The runs go
round-robin over the tests, so that the machine's load hits all of them alike. Every comparison a test makes
appends its differences and the hashes of both sides (trainer, reference) to $QWEN15_EQUIVALENCE_LOG; the
summary gives, per comparison, the largest difference over the runs and how many distinct results each side
gave (1 and 1: both deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_train.py::test_single_process_equals_the_reference_loop",
    "tests/test_train_distributed.py::test_data_parallel_equals_one_process",
    "tests/test_train_distributed.py::test_resume_with_another_process_count_reshards_and_continues_the_data",
    "tests/test_train_distributed.py::test_finetune_from_hf_folder_in_two_processes",
    "tests/test_parallel_train.py::test_tensor_and_pipeline_parallel_training_on_two_processes",
    "tests/test_parallel_train.py::test_hybrid_layouts_on_four_processes",
    "tests/test_parallel_train.py::test_checkpoint_moves_between_layouts_and_exports_from_any",
]
KEYS = ("loss_rel", "update_rel", "weight_abs")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tests", nargs="*", default=TESTS, help="pytest node ids (default: the equivalence tests)")
    p.add_argument("-n", "--runs", type=int, default=20)
    p.add_argument("--out", type=Path, help="also write every record (JSON lines) here")
    args = p.parse_args()

    passes: dict[str, int] = defaultdict(int)
    records: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for test in args.tests:
                log = Path(tmp) / "log.jsonl"
                log.unlink(missing_ok=True)
                env = dict(os.environ, QWEN15_EQUIVALENCE_LOG=str(log))
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                passes[test] += proc.returncode == 0
                lines = log.read_text().splitlines() if log.exists() else []
                for i, line in enumerate(lines):
                    # comparisons keep their order within a test: the i-th one is the same check in every run
                    records.append(dict(json.loads(line), run=run, check=f"{test.split('::')[-1]} #{i}"))
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.writelines(json.dumps(r) + "\n" for r in records[len(records) - len(lines) :])
                status = "passed" if proc.returncode == 0 else "FAILED:\n" + proc.stdout[-3000:]
                elapsed = time.monotonic() - start
                print(f"[run {run + 1}/{args.runs}, {elapsed / 60:.0f} min] {test}: {status}", flush=True)

    print(f"\n{args.runs} runs of each test, {(time.monotonic() - start) / 60:.0f} min")
    print("| test | passed |")
    print("| --- | --- |")
    for test in args.tests:
        print(f"| {test} | {passes[test]}/{args.runs} |")
    by_check: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_check[r["check"]].append(r)
    print("\n| comparison | runs | max loss rel. diff | max update rel. error | max weight abs. diff | "
          "distinct trainer results | distinct reference results |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for check, rs in by_check.items():
        worst = [max(r[k] for r in rs) for k in KEYS]
        distinct = [len({r[side] for r in rs}) for side in ("trainer", "reference")]
        print(
            f"| {check} | {len(rs)} | "
            + " | ".join(f"{w:.3g}" for w in worst)
            + f" | {distinct[0]} | {distinct[1]} |"
        )
    if records:
        print(
            "\nover all comparisons: " + ", ".join(f"max {k} {max(r[k] for r in records):.3g}" for k in KEYS)
        )
    return 0 if all(passes[t] == args.runs for t in args.tests) else 1


if __name__ == "__main__":
    sys.exit(main())
