"""The end-to-end cost of a calibrated training step, and the calibrator's memory.

The demo's ``LateFusion`` on the six UCI views, widened to ~10 M parameters (hidden 2048,
embedding 704), batch 256, AdamW, M = 7 objectives (fused + one per view); every encoder
is calibrated. Per method, one step splits into forward, the per-objective backward
(``backward_mode="loop"`` and ``"batched"``), calibration (``cal.step()``) and the
optimizer step; the plain summed step (one backward) is the baseline.

Run by ``python -m mmgrad bench`` after the kernel tables, or alone:
``python -m mmgrad.bench_step``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

from .bench import timeit
from .calibrator import FusedCalibrator
from .models import LateFusion

# The six UCI multiple-features views and their widths (mmgrad.data).
UCI_DIMS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
# (label, method, options): mgda also lagged (the Gram of this step's read serves the next)
CASES = (("bogc", "bogc", {}), ("mgda", "mgda", {}), ("mgda lagged", "mgda", {"lagged": True}),
         ("mmpareto", "mmpareto", {}), ("mimo", "mimo", {}), ("sum", "sum", {}))
METHODS = ("bogc", "mgda", "mmpareto", "mimo", "sum")


@dataclass
class StepTimes:
    method: str
    forward: float
    backward: float
    backward_batched: float
    calibrate: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.calibrate + self.optimizer


def make_model(hidden: int = 2048, embed: int = 704, seed: int = 0) -> LateFusion:
    torch.manual_seed(seed)
    return LateFusion(UCI_DIMS, num_classes=10, hidden=hidden, embed=embed)


def make_batch(batch: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = {v: torch.randn(batch, d, generator=gen) for v, d in UCI_DIMS.items()}
    return x, torch.randint(0, 10, (batch,), generator=gen)


def time_plain_step(model: LateFusion, x, y, reps: int) -> StepTimes:
    """The baseline: ``sum(losses).backward()`` and the optimizer, no calibrator."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state: Dict[str, object] = {}

    def forward():
        state["loss"] = torch.stack(model.losses(x, y)).sum()

    def backward():
        model.zero_grad(set_to_none=True)  # as every training step does
        forward()
        state["loss"].backward()  # type: ignore[union-attr]

    fwd = timeit(forward, min_time=0.0, min_reps=reps, max_reps=reps)  # reps calls after a warm-up
    bwd = timeit(backward, min_time=0.0, min_reps=reps, max_reps=reps) - fwd
    opt_t = timeit(opt.step, min_time=0.0, min_reps=reps, max_reps=reps)
    opt.zero_grad()
    return StepTimes("plain sum", fwd, bwd, bwd, 0.0, opt_t)


def time_calibrated_step(model: LateFusion, x, y, label: str, method: str, options: dict, reps: int) -> StepTimes:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: Dict[str, List[float]] = {k: [] for k in ("forward", "backward", "batched", "calibrate", "optimizer")}
    for mode in ("loop", "batched"):
        cal = FusedCalibrator(model.param_groups(), len(UCI_DIMS) + 1, method=method, backward_mode=mode, **options).attach(opt)
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            losses = model.losses(x, y)
            t1 = time.perf_counter()
            cal.backward(losses)
            t2 = time.perf_counter()
            cal.step()
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t4 = time.perf_counter()
            if rep == 0:
                continue  # warm-up
            times["forward"].append(t1 - t0)
            times["backward" if mode == "loop" else "batched"].append(t2 - t1)
            if mode == "loop":
                times["calibrate"].append(t3 - t2)
                times["optimizer"].append(t4 - t3)
        cal.detach()
        del cal  # frees the parameters for the next calibrator
    med = {k: statistics.median(v) for k, v in times.items()}
    return StepTimes(label, med["forward"], med["backward"], med["batched"], med["calibrate"], med["optimizer"])


def calibrator_memory(model: LateFusion, method: str) -> Dict[str, int]:
    """Bytes the calibrator holds (grad buffer, EMA state, output) next to the model's own."""
    cal = FusedCalibrator(model.param_groups(), len(UCI_DIMS) + 1, method=method)
    x, y = make_batch(8)
    cal.backward(model.losses(x, y))  # allocates the M x N buffer
    held = cal.memory_bytes()
    del cal
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**held, "params": params, "adamw_state": 2 * params}


def main(reps: int = 5) -> None:
    model = make_model()
    x, y = make_batch()
    n_params = sum(p.numel() for p in model.parameters())
    n_cal = sum(p.numel() for g in model.param_groups() for p in g["params"])
    print(f"\nend-to-end step: LateFusion on the 6 UCI views, {n_params / 1e6:.1f} M parameters "
          f"({n_cal / 1e6:.1f} M calibrated), batch 256, AdamW, M = {len(UCI_DIMS) + 1}; medians of {reps} steps, ms")
    first = time_plain_step(model, x, y, reps)
    print(f"{'method':11s} {'forward':>8s} {'backward':>9s} {'(batched)':>9s} {'calibrate':>9s} {'optimizer':>9s} "
          f"{'total':>8s} {'calib/plain':>11s} {'calib/(step-calib)':>18s}")
    rows = [time_calibrated_step(model, x, y, label, m, opts, reps) for label, m, opts in CASES]
    # the baseline before and after the calibrated runs, averaged: the machine drifts
    last = time_plain_step(model, x, y, reps)
    plain = StepTimes("plain sum", *[(getattr(first, k) + getattr(last, k)) / 2 for k in
                                     ("forward", "backward", "backward_batched", "calibrate", "optimizer")])
    rows = [plain, *rows]
    for r in rows:
        ms = lambda s: f"{1e3 * s:8.1f}"
        print(f"{r.method:11s} {ms(r.forward)} {ms(r.backward)} {ms(r.backward_batched)} {ms(r.calibrate)} "
              f"{ms(r.optimizer)} {ms(r.total)} {100 * r.calibrate / plain.total:10.0f}% "
              f"{100 * r.calibrate / (r.total - r.calibrate):17.0f}%", flush=True)
    print("\ncalibrator memory (held between steps), MiB:")
    print(f"{'method':10s} {'grad buffer':>11s} {'EMA state':>10s} {'output':>7s} {'total':>7s} {'params':>7s} {'AdamW state':>11s} {'total/(params+AdamW)':>20s}")
    for method in METHODS:
        mem = calibrator_memory(model, method)
        mib = lambda b: f"{b / 2**20:7.0f}"
        total = mem["grad_buffer"] + mem["ema_state"] + mem["output"]
        print(f"{method:10s} {mib(mem['grad_buffer']):>11s} {mib(mem['ema_state']):>10s} {mib(mem['output'])} {mib(total)} "
              f"{mib(mem['params'])} {mib(mem['adamw_state']):>11s} {total / (mem['params'] + mem['adamw_state']):19.2f}x")


if __name__ == "__main__":
    main()
