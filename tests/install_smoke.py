"""What a new user runs after ``pip install mmgrad``, from outside the checkout.

``python install_smoke.py cpu``: the cpu backend must be available (compiled on first use);
``python install_smoke.py reference``: no compiler, so exactly one warning says why, and
training runs on the reference backend. Either way: backends listed, three training steps.
"""

from __future__ import annotations

import sys
import warnings

import torch


def main(expect: str) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mmgrad

        info = mmgrad.backends()
        for row in info.values():
            print(row)
        torch.manual_seed(0)
        enc_a, enc_b, head = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.nn.Linear(8, 3)
        params = [*enc_a.parameters(), *enc_b.parameters(), *head.parameters()]
        cal = mmgrad.FusedCalibrator(params, num_objectives=3, method="bogc")
        opt = torch.optim.SGD(params, lr=0.1)
        xa, xb, y = torch.randn(16, 6), torch.randn(16, 5), torch.randint(0, 3, (16,))
        for _ in range(3):
            za, zb = enc_a(xa), enc_b(xb)
            fused = head(torch.cat([za, zb], dim=1))
            losses = [torch.nn.functional.cross_entropy(fused, y), za.pow(2).mean(), zb.pow(2).mean()]
            opt.zero_grad()
            cal.backward(losses)
            assert cal.step() is True
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)
    mine = [w for w in caught if "mmgrad" in str(w.message)]
    print(f"mmgrad {mmgrad.__version__} from {mmgrad.__file__}: 3 steps on backend {cal.backend_name!r}; "
          f"{len(mine)} mmgrad warning(s)")
    for w in mine:
        print(f"  warning: {w.message}")
    if expect == "cpu":
        assert info["cpu"].available and cal.backend_name == "cpu" and not mine, "the cpu backend should have compiled"
    else:
        assert not info["cpu"].available and cal.backend_name == "reference", "no compiler: the reference backend"
        assert len(mine) == 1 and "cpu backend is unavailable" in str(mine[0].message), "one warning, saying why"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
