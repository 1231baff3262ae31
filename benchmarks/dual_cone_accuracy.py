"""The device solver of UPGrad's and DualProj's dual-cone projections (the triton
backend's ``dual_cone_weights``; Triton's interpreter where there is no GPU) against the
host's exact active-set solution on ill-conditioned Gram matrices.

    python benchmarks/dual_cone_accuracy.py [--draws 120] [--seed 0]

Draws ``mmgrad.tools.verify.ill_conditioned_gram`` of every kind at M = 2..16, a
preference vector with some zeros, and ``reg_eps`` 1e-4 (the default) or 1e-6 (the
smallest the device takes), and prints per kind the worst of
``mmgrad.tools.verify.dual_cone_errors``: the distance to the host's solution, the
infeasibility and the conflict (tests/test_device_dual_cone.py asserts 1e-8, 1e-10 and
1e-10). docs/solver.md quotes its output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmgrad import ops  # noqa: E402
from mmgrad.reference.gramian import dual_cone_weights  # noqa: E402
from mmgrad.tools.verify import ILL_CONDITIONED_KINDS, dual_cone_errors, ill_conditioned_gram  # noqa: E402

BOUNDS = {"distance": 1e-8, "infeasibility": 1e-10, "conflict": 1e-10}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    per_kind = max(1, args.draws // len(ILL_CONDITIONED_KINDS))
    print(f"{per_kind} draws per kind, M = 2..16, reg_eps 1e-4 or 1e-6, on {device}"
          f"{' (Triton interpreter)' if device == 'cpu' else ''}")
    print(f"{'kind':24s} {'distance':>10s} {'infeasible':>10s} {'conflict':>10s}")
    failed = 0
    for kind in ILL_CONDITIONED_KINDS:
        worst = dict.fromkeys(BOUNDS, 0.0)
        for _ in range(per_kind):
            seed, m = int(torch.randint(0, 2**31, (), generator=gen)), int(torch.randint(2, 17, (), generator=gen))
            reg = (1e-4, 1e-6)[int(torch.randint(0, 2, (), generator=gen))]
            k = ill_conditioned_gram(seed, m, kind)
            u = torch.rand(m, generator=gen, dtype=torch.float64) * (torch.rand(m, generator=gen) < 0.7)
            v = ops.moo_weights(k[None].to(device), "dualproj", backend="triton", pref_vector=u.tolist(),
                                reg_eps=reg)[0].cpu()
            host = dual_cone_weights(k[None], "dualproj", pref_vector=u.tolist(), reg_eps=reg)[0]
            for name, value in dual_cone_errors(k, u, v, host, reg_eps=reg).items():
                worst[name] = max(worst[name], value)
        failed += any(worst[name] > bound for name, bound in BOUNDS.items())
        print(f"{kind:24s} {worst['distance']:10.2e} {worst['infeasibility']:10.2e} {worst['conflict']:10.2e}")
    print("all within the tests' bounds" if not failed else f"{failed} kinds outside the tests' bounds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
