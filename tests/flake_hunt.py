"""``make flake-hunt``: rerun the randomized tests with fresh seeds and print every failing seed.

A test is randomized when it takes the ``gen`` fixture (``conftest.py`` marks it so);
each run draws new seeds. Every failure is listed with the seed it printed and the
command that reproduces it. The exit status is 1 if any run failed.

    python tests/flake_hunt.py [--runs 20] [--jobs 2] [-k EXPRESSION]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
MARKERS = "randomized and not gpu_proof and not gpu and not slow"


def failures(report: Path) -> List[Tuple[str, str]]:
    """(test id, seed) of each failed or erroring test case in a JUnit XML report."""
    found = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        seed = next((p.get("value", "?") for p in case.iter("property") if p.get("name") == "seed"), "?")
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        found.append((name, seed))
    return found


def one_run(index: int, keyword: Optional[str], tmp: Path) -> Tuple[int, float, List[Tuple[str, str]], str]:
    report = tmp / f"run-{index}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", MARKERS, f"--junitxml={report}",
           "-o", "junit_family=xunit1", "tests", *(["-k", keyword] if keyword else [])]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MMGRAD_QUIET": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-300:]
    return index, seconds, failures(report) if report.exists() else [("(no report)", "?")], tail


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/flake_hunt.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="how many runs (default 20)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("-k", dest="keyword", default=None, help="only the tests pytest's -k selects")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    failed: List[Tuple[int, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mmgrad-flake-hunt-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        for index, seconds, found, tail in pool.map(lambda i: one_run(i, args.keyword, Path(tmp)), range(args.runs)):
            print(f"run {index + 1:2d}/{args.runs}: {seconds:6.1f} s  {tail}", flush=True)
            failed += [(index + 1, name, seed) for name, seed in found]
    print(f"\n{args.runs} runs of the tests marked `{MARKERS}` in {time.perf_counter() - t0:.0f} s: "
          f"{len(failed)} failures")
    for run, name, seed in failed:
        print(f"  run {run}: {name}  seed={seed}\n    MMGRAD_TEST_SEED={seed} python -m pytest '{name}'")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
