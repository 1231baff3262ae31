"""Checkpoint in one process, resume in another (tests/test_checkpoint_process.py).

    python tests/checkpoint_worker.py first  BACKEND DIR   # uninterrupted run + a 5-step checkpoint
    python tests/checkpoint_worker.py resume BACKEND DIR   # a new process: load, 5 more steps
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmgrad  # noqa: E402
from toy_model import TwoView, batch  # noqa: E402

STEPS, SPLIT = 10, 5
CASES = {"bogc": {}, "mmpareto": {"lagged": True}, "mimo": {}}


def make(method: str, backend: str):
    torch.manual_seed(0)
    model = TwoView()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, backend=backend, **CASES[method]).attach(opt)
    return model, opt, cal


def run(model, opt, cal, steps: range) -> None:
    gen = torch.Generator().manual_seed(7)
    data = [batch(gen) for _ in range(STEPS)]
    for i in steps:
        cal.backward(model.losses(*data[i]))
        opt.step()
        opt.zero_grad()


def main() -> None:
    mode, backend, folder = sys.argv[1:4]
    for method in CASES:
        path = os.path.join(folder, f"{method}.pt")
        if mode == "first":
            model, opt, cal = make(method, backend)
            run(model, opt, cal, range(STEPS))
            uninterrupted = [p.detach().clone() for p in model.parameters()]
            model, opt, cal = make(method, backend)
            run(model, opt, cal, range(SPLIT))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "cal": cal.state_dict(),
                        "uninterrupted": uninterrupted}, path)
        else:
            saved = torch.load(path)
            model, opt, cal = make(method, backend)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            cal.load_state_dict(saved["cal"])
            run(model, opt, cal, range(SPLIT, STEPS))
            torch.save({"resumed": [p.detach().clone() for p in model.parameters()],
                        "uninterrupted": saved["uninterrupted"]}, path)


if __name__ == "__main__":
    main()
