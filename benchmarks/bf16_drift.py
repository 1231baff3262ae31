"""The distribution of BOGC's bf16-state drift from the float64 oracle, over many seeds.

``tests/test_layout.py::test_bf16_state_drift_stays_within_its_bound_of_the_float64_oracle``
draws 12 seeds and bounds their median (1 %) and their worst (5 %). This measures the
per-run drift (worst relative error over 8 steps of a 3-view LateFusion, the test's
``_drift``) over ``--seeds`` seeds per backend, and the chance that the test's two
checks fail on a fresh draw of 12, estimated from that distribution (10,000 resamples).

    python benchmarks/bf16_drift.py [--seeds 1000] [--backends cpu,triton] [--jobs 2]

``--jobs`` spreads the seeds over processes of one thread each (a run of this small model
uses about one core; the interpreter's is Python); each seed's drift is the same at any
``--jobs``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

import mmgrad  # noqa: E402
from test_layout import BF16_MEDIAN_BOUND, BF16_RUN_BOUND, _drift  # noqa: E402


def _one_thread() -> None:
    torch.set_num_threads(1)


def drifts(backend: str, seeds: int, jobs: int) -> list:
    """Each seed's worst relative drift over the test's 8 steps, in seed order."""
    args = [(backend, seed, torch.bfloat16) for seed in range(seeds)]
    if jobs <= 1:
        return [_drift(*a) for a in args]
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_one_thread) as pool:
        return pool.starmap(_drift, args, chunksize=4)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1000)
    p.add_argument("--backends", default=",".join(b for b in ("reference", "cpu", "triton") if mmgrad.backends()[b].available))
    p.add_argument("--jobs", type=int, default=1, help="processes, one thread each")
    args = p.parse_args()
    print(f"bf16 state drift over {args.seeds} seeds ({args.jobs} process(es)); torch {torch.__version__}; test bounds: median of 12 <= "
          f"{BF16_MEDIAN_BOUND:.0%}, worst of 12 <= {BF16_RUN_BOUND:.0%}")
    rng = random.Random(0)
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        runs = sorted(drifts(backend, args.seeds, args.jobs))
        q = lambda f: runs[min(len(runs) - 1, int(f * len(runs)))]  # noqa: E731
        fails = 0
        for _ in range(10_000):
            draw = sorted(rng.choices(runs, k=12))
            fails += (draw[5] + draw[6]) / 2 > BF16_MEDIAN_BOUND or draw[-1] > BF16_RUN_BOUND
        print(f"{backend:9s} median {statistics.median(runs):.3%}, 95th {q(0.95):.3%}, 99th {q(0.99):.3%}, "
              f"worst {runs[-1]:.3%}; runs over {BF16_RUN_BOUND:.0%}: {sum(r > BF16_RUN_BOUND for r in runs)}; "
              f"the test fails on {fails / 10_000:.2%} of draws ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
