"""The device MOO solver (csrc/mmgrad_math.h, through the CPU build) against docs/spec.md §4's
certificate on ill-conditioned Gram matrices, next to the host's Wolfe solver.

    python benchmarks/solver_certificate.py [--draws 20000] [--seed 0]

Draws ``mmgrad.tools.verify.ill_conditioned_gram`` of every kind at M = 3..16, solves each with
both, and prints per kind the worst duality gap of each (relative to max K_mm; the
certificate is 1e-7) and the mean time per solve. docs/solver.md quotes its output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmgrad.backends import cpu_extension  # noqa: E402
from mmgrad.reference.moo import MGDA_GAP_TOL, min_norm_solve  # noqa: E402
from mmgrad.tools.verify import ILL_CONDITIONED_KINDS, duality_gap, ill_conditioned_gram  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ext = cpu_extension()
    if ext is None:
        print("the C++ extension is not built (make build)", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(args.seed)
    per_kind = args.draws // len(ILL_CONDITIONED_KINDS)
    print(f"{per_kind} draws per kind, M = 3..16; gaps relative to max K_mm (certificate {MGDA_GAP_TOL:g})")
    print(f"{'kind':24s} {'device worst':>12s} {'host worst':>12s} {'device us':>10s} {'host us':>9s}")
    failed = 0
    for kind in ILL_CONDITIONED_KINDS:
        worst_dev = worst_host = t_dev = t_host = 0.0
        for _ in range(per_kind):
            seed, m = int(torch.randint(0, 2**31, (), generator=gen)), int(torch.randint(3, 17, (), generator=gen))
            k = ill_conditioned_gram(seed, m, kind)
            top = float(k.diagonal().max())
            t0 = time.perf_counter()
            w = ext.moo_weights_device(k[None].contiguous(), 0, 0, torch.ones(m, dtype=torch.float64), 1.5)[0]
            t1 = time.perf_counter()
            h = torch.from_numpy(min_norm_solve(k.numpy()))
            t2 = time.perf_counter()
            t_dev, t_host = t_dev + t1 - t0, t_host + t2 - t1
            worst_dev = max(worst_dev, duality_gap(k, w) / top)
            worst_host = max(worst_host, duality_gap(k, h) / top)
        failed += worst_dev > MGDA_GAP_TOL
        print(f"{kind:24s} {worst_dev:12.2e} {worst_host:12.2e} {1e6 * t_dev / per_kind:10.1f} {1e6 * t_host / per_kind:9.1f}")
    print("all within the certificate" if not failed else f"{failed} kinds outside the certificate")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
