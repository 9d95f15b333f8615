"""Run many `qwen15` command lines in one Python process, each through qwen15.cli.main with its own stdout, stderr
and stdin, and report for each its exit code, its stderr and the files it changed under a watched folder.

    python tests/cli_batch.py CASES.json RESULTS.json WATCHED_FOLDER

CASES.json: [{"id": ..., "argv": [...], "stdin": "..."}]. Used by test_bad_input.py: hundreds of bad inputs go
through the real command-line entry without paying Python's and torch's start-up for each.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` by content hash, every folder as 'dir' (what a case must leave as it found)."""
    out: dict[str, str] = {}
    for dirpath, _dirs, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    out[os.path.join(rel, name)] = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
            except OSError as e:
                out[os.path.join(rel, name)] = f"unreadable: {e.strerror}"
    return out


def run_case(case: dict, cli_main) -> dict:
    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO(case.get("stdin", ""))
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(list(case["argv"]))
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            except BaseException:  # what escapes the CLI entry (before the fix: every unexpected exception)
                traceback.print_exc()
                code = "escaped"
    finally:
        sys.stdin = stdin
    return {
        "code": code,
        "stderr": err.getvalue(),
        "stdout": out.getvalue()[-2000:],
        "s": time.perf_counter() - t,
    }


def main() -> None:
    cases_file, results_file, watched = sys.argv[1:4]
    cases = json.loads(Path(cases_file).read_text())
    root = Path(watched)
    from qwen15.cli import main as cli_main

    results = []
    for case in cases:
        before = snapshot(root)
        result = run_case(case, cli_main)
        after = snapshot(root)
        result["changed"] = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        result["id"] = case["id"]
        results.append(result)
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
