"""One small calibrated training step of each method on each GPU backend, for
compute-sanitizer (memcheck, racecheck) in ``make device-check``: sizes that are not
multiples of a block, two parameter groups, a sync-free step on triton.

``python tests/gpu_small_steps.py`` on a GPU; ``--device cpu`` runs the triton backend
in its interpreter instead (set by this script), which is how the CPU tests check it.
"""

from __future__ import annotations

import argparse
import os
import sys


def small_step(method: str, backend: str, device, sync_free: bool = False) -> None:
    import torch

    import mmgrad

    torch.manual_seed(0)
    enc_a, enc_b = torch.nn.Linear(37, 19).to(device), torch.nn.Linear(23, 19).to(device)
    head = torch.nn.Linear(38, 3).to(device)
    params = [*enc_a.parameters(), *enc_b.parameters(), *head.parameters()]
    opt = (torch.optim.Adam(params, lr=1e-3, fused=True) if sync_free else torch.optim.SGD(params, lr=0.1))
    kw = {"sync_free": True, "skip_nonfinite": True} if sync_free else {}
    cal = mmgrad.FusedCalibrator([{"params": enc_a.parameters()}, {"params": enc_b.parameters()}], 3, method=method,
                                 backend=backend, **kw).attach(opt)
    xa, xb = torch.randn(13, 37, device=device), torch.randn(13, 23, device=device)
    y = torch.randint(0, 3, (13,), device=device)
    ce = torch.nn.functional.cross_entropy
    za, zb = enc_a(xa), enc_b(xb)
    cal.backward([ce(head(torch.cat([za, zb], 1)), y), ce(head(torch.cat([za, za], 1)), y),
                  ce(head(torch.cat([zb, zb], 1)), y)])
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert all(bool(torch.isfinite(p).all()) for p in params), f"{method} on {backend}: non-finite parameters"
    cal.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    import mmgrad

    device = torch.device(args.device)
    names = [b for b in (("triton",) if device.type == "cpu" else ("triton", "cuda")) if mmgrad.backends()[b].available]
    if not names:
        print(f"gpu_small_steps: no GPU backend runs on {device} here", file=sys.stderr)
        return 1
    for backend in names:
        for method in mmgrad.methods.BUILTIN:
            small_step(method, backend, device)
            print(f"{backend} {method}: one step", flush=True)
        if backend == "triton" and device.type == "cuda":
            for method in (m for m in mmgrad.methods.BUILTIN if mmgrad.methods.METHODS[m].sync_free):
                small_step(method, backend, device, sync_free=True)
                print(f"{backend} {method} sync_free: one step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
