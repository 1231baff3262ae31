"""The end-to-end cost of a calibrated training step, the calibrator's memory, and the targets.

The demo's ``LateFusion`` on the six UCI views, widened to ~10 M parameters (hidden 2048,
embedding 704), batch 256, AdamW, M = 7 objectives (fused + one per view); every encoder
is calibrated, and each is reached by two objectives (its view's loss and the fused one).

Per method, one step splits into forward, the per-objective backward (``"loop"``, and
``"batched"`` for comparison; both include finding the reach), calibration
(``cal.step()``, after a ``backward`` run inside ``cal.accumulate()`` so that it does not
calibrate itself) and the optimizer step; the plain summed step is the baseline. "0.1"
is mmgrad 0.1's step on the same inputs in the same run: the same kernels over the dense
``M x N`` buffer, with two slots of EMA state (``dense_step``). "x mimo" is each
method's calibration time over mimo's (MIMO's claim is that the MOO baselines cost many
times what it does; the Gramian baselines' rows measure it in mmgrad's terms).

Run by ``python -m mmgrad bench`` after the kernel tables, or alone:
``python -m mmgrad bench-step``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import ops
from ..calibrator import FusedCalibrator
from ..collect import GRADS, graph_reach
from ..reference.gramian import HOST_SOLVED
from ..training.models import LateFusion
from . import describe
from .timing import timeit

# The six UCI multiple-features views and their widths (mmgrad.training.data).
UCI_DIMS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
M = len(UCI_DIMS) + 1
# (label, method, options): mgda also lagged (the Gram of this step's read serves the next)
CASES = (("bogc", "bogc", {}), ("bogc bf16", "bogc", {"state_dtype": torch.bfloat16}), ("mgda", "mgda", {}),
         ("mgda lagged", "mgda", {"lagged": True}), ("mmpareto", "mmpareto", {}), ("mimo", "mimo", {}), ("sum", "sum", {}))
# the Gramian baselines solved on the host: timed (their cost against mimo's), their memory is
# mgda's; each also lagged, which reads the rows once a step as mimo does
BASELINE_CASES = tuple(case for name in HOST_SOLVED for case in ((name, name, {}), (f"{name} lagged", name, {"lagged": True})))
# mmgrad 0.1's methods: the only ones with a "0.1" column
METHODS_OF_0_1 = ("bogc", "mgda", "mmpareto", "mimo")
# the targets: extra memory over plain training, calibration time over a plain step
MEMORY_TARGETS = {"bogc": 1.5, "bogc bf16": 1.0, "mgda": 0.6, "mgda lagged": 0.6, "mmpareto": 0.6, "mimo": 0.6}
TIME_TARGETS = {"bogc": 0.40, "bogc bf16": 0.40, "mgda": 0.15, "mgda lagged": 0.15, "mmpareto": 0.15, "mimo": 0.10}


@dataclass
class StepTimes:
    method: str
    forward: float
    backward: float
    backward_batched: float
    calibrate: float
    optimizer: float
    before: float = 0.0  # mmgrad 0.1's calibration (dense, two slots), same inputs

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


def dense_step(cal: FusedCalibrator, method: str, options: dict) -> Callable[[], None]:
    """mmgrad 0.1's calibration on the inputs ``cal`` holds now: the dense ``M x N`` buffer
    (every row, reached or not) through the same kernels, EMA state in two slots."""
    grads = cal.layout.dense(GRADS)
    n, off = cal.num_elements, cal.group_offsets
    out = torch.empty(n)
    if method == "bogc":
        state = torch.zeros(2, 2, M, n)  # mean, var x two slots
        return lambda: ops.bogc_step(grads, state[0, 0], state[1, 0], 1, mean_out=state[0, 1], var_out=state[1, 1],
                                     group_offsets=off, out=out)
    if method == "mimo":
        alpha = torch.full((off.numel() - 1, M), 1.0 / M, dtype=torch.float64)
        return lambda: ops.combine_and_gram(grads, alpha, group_offsets=off, out=out, with_gram=False)

    def moo() -> None:
        alpha = ops.moo_weights(ops.gram(grads, group_offsets=off), method)
        ops.combine_and_gram(grads, alpha, group_offsets=off, out=out, with_gram=False)

    return moo


def time_calibrated_step(model: LateFusion, x, y, label: str, method: str, options: dict, reps: int) -> StepTimes:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: Dict[str, List[float]] = {k: [] for k in ("forward", "backward", "batched", "calibrate", "optimizer")}
    before = 0.0
    for mode in ("loop", "batched"):
        cal = FusedCalibrator(model.param_groups(), M, method=method, backward_mode=mode, **options).attach(opt)
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            losses = model.losses(x, y)
            t1 = time.perf_counter()
            with cal.accumulate():  # defers the calibration, so that it is timed on its own
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
        if mode == "loop" and method in METHODS_OF_0_1 and label != "bogc bf16":  # 0.1 had no bf16 state
            with cal.accumulate():
                cal.backward(model.losses(x, y))
            before = timeit(dense_step(cal, method, options), min_time=0.0, min_reps=reps, max_reps=reps)
            cal.step()
            opt.zero_grad()
        cal.detach()
        del cal  # frees the parameters for the next calibrator
    med = {k: statistics.median(v) for k, v in times.items()}
    return StepTimes(label, med["forward"], med["backward"], med["batched"], med["calibrate"], med["optimizer"], before)


def reach_seconds(model: LateFusion, x, y, reps: int) -> float:
    """What finding the reach costs per step: the walk over the M losses' graphs."""
    params = [p for g in model.param_groups() for p in g["params"]]
    losses = model.losses(x, y)
    return timeit(lambda: graph_reach(losses, params, M), min_time=0.0, min_reps=reps, max_reps=reps)


def calibrator_memory(model: LateFusion, method: str, options: dict) -> Dict[str, int]:
    """Bytes the calibrator holds between steps (rows, EMA state, output), next to the
    model's own, and what 0.1's dense layout with two state slots held."""
    cal = FusedCalibrator(model.param_groups(), M, method=method, **options)
    x, y = make_batch(8)
    cal.backward(model.losses(x, y))  # lays out the rows
    held = cal.memory_bytes()
    n, elt = cal.num_elements, 4
    dense = 0 if method == "sum" else (M * n + n) * elt + (4 * M * n * elt if method == "bogc" else 0)
    layout_rows = cal.layout.rows_held()
    others = sum(p.numel() for p in model.parameters()) - n
    del cal
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**held, "params": params, "calibrated_grad": n * elt, "dense_held": dense,
            "allreduce_rows": layout_rows * elt, "allreduce_dense": M * n * elt, "allreduce_others": others * elt}


def _verdict(value: float, target: Optional[float]) -> str:
    if target is None:
        return ""
    return "met" if value <= target else f"MISSED by {value / target:.2f}x"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgrad bench-step", description=describe(__doc__))
    p.add_argument("--reps", type=int, default=5, help="timed steps per row (medians; default 5)")
    reps = p.parse_args([] if argv is None else argv).reps
    model = make_model()
    x, y = make_batch()
    n_params = sum(p.numel() for p in model.parameters())
    n_cal = sum(p.numel() for g in model.param_groups() for p in g["params"])
    print(f"\nend-to-end step: LateFusion on the 6 UCI views, {n_params / 1e6:.1f} M parameters "
          f"({n_cal / 1e6:.1f} M calibrated), batch 256, AdamW, M = {M}; medians of {reps} steps, ms")
    first = time_plain_step(model, x, y, reps)
    rows = [time_calibrated_step(model, x, y, label, m, opts, reps) for label, m, opts in (*CASES, *BASELINE_CASES)]
    last = time_plain_step(model, x, y, reps)  # the baseline before and after, averaged: the machine drifts
    plain = StepTimes("plain sum", *[(getattr(first, k) + getattr(last, k)) / 2 for k in
                                     ("forward", "backward", "backward_batched", "calibrate", "optimizer")])
    ms = lambda s: f"{1e3 * s:8.1f}"  # noqa: E731
    mimo = next(r.calibrate for r in rows if r.method == "mimo")
    w = max(len(r.method) for r in rows)
    print(f"{'method':{w}s} {'forward':>8s} {'backward':>9s} {'(batched)':>9s} {'calibrate':>9s} {'optimizer':>9s} "
          f"{'total':>8s} {'calib/plain':>11s} {'x mimo':>6s} {'0.1 calib':>9s} {'0.1/plain':>9s} {'target':>7s}")
    for r in [plain, *rows]:
        share, target = r.calibrate / plain.total, TIME_TARGETS.get(r.method)
        old = f"{ms(r.before)} {100 * r.before / plain.total:8.0f}%" if r.before else f"{'':8s} {'':9s}"
        tgt = f"{100 * target:6.0f}%" if target else f"{'':7s}"
        vs_mimo = f"{r.calibrate / mimo:6.2f}" if r.calibrate else f"{'':6s}"
        print(f"{r.method:{w}s} {ms(r.forward)} {ms(r.backward)} {ms(r.backward_batched)} {ms(r.calibrate)} "
              f"{ms(r.optimizer)} {ms(r.total)} {100 * share:10.0f}% {vs_mimo} {old} {tgt} {_verdict(share, target)}",
              flush=True)
    walk = reach_seconds(model, x, y, reps)
    print(f"finding the reach (a walk over the {M} losses' autograd graphs, inside backward): "
          f"{1e3 * walk:.2f} ms per step, {100 * walk / plain.total:.2f}% of a plain step")

    allreduce = None
    print("\ncalibrator memory held between steps, MiB; extra = held - the calibrated .grad it replaces "
          "(.grad views its output); plain = params + .grad + AdamW state")
    print(f"{'method':11s} {'rows':>7s} {'EMA':>7s} {'output':>7s} {'held':>7s} {'extra':>7s} {'plain':>7s} "
          f"{'extra/plain':>11s} {'0.1 extra/plain':>15s} {'target':>7s}")
    mib = lambda b: f"{b / 2**20:7.0f}"  # noqa: E731
    for label, method, opts in CASES:
        mem = calibrator_memory(model, method, opts)
        allreduce = allreduce if method == "sum" else mem
        plain_bytes = 4 * mem["params"]
        held = mem["grad_buffer"] + mem["ema_state"] + mem["output"]
        extra = held - (mem["calibrated_grad"] if method != "sum" else 0)
        old_extra = mem["dense_held"] - (mem["calibrated_grad"] if method != "sum" else 0)
        target = MEMORY_TARGETS.get(label)
        print(f"{label:11s} {mib(mem['grad_buffer'])} {mib(mem['ema_state'])} {mib(mem['output'])} {mib(held)} {mib(extra)} "
              f"{mib(plain_bytes)} {extra / plain_bytes:10.2f}x {old_extra / plain_bytes:14.2f}x "
              f"{(f'{target:6.1f}x' if target else ''):>7s} {_verdict(extra / plain_bytes, target)}")
    rows_b, dense_b, others_b = (allreduce[k] for k in ("allreduce_rows", "allreduce_dense", "allreduce_others"))
    print(f"\nall-reduce volume per step under data parallelism (loop or batched), MiB: reached rows "
          f"{rows_b / 2**20:.0f} + uncalibrated grads {others_b / 2**20:.0f} = {(rows_b + others_b) / 2**20:.0f}; "
          f"0.1's dense buffer {(dense_b + others_b) / 2**20:.0f}; plain DDP {allreduce['params'] / 2**20:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
