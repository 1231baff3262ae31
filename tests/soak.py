"""``make soak``: thousands of calibrated steps under injected faults, resumed in new processes.

The bench model (``mmgrad.tools.bench_step``'s ``LateFusion`` on the six UCI views;
``--hidden``/``--embed`` scale it, its full size is 2048/704) trains ``--steps`` steps
with every method on fresh batches (a function of the step, so any process regenerates
them), while faults are injected on a fixed schedule:

* a NaN loss every 97 steps: half the methods raise (``NonFiniteGradientError``, caught,
  the step abandoned), the other half run with ``skip_nonfinite=True``;
* an overflowing loss under a ``GradScaler`` every 89 steps (the scaler skips and backs
  off; it scales every step from 1/4 of the run on);
* two accumulated micro-batches every 5 steps;
* a reach change at half the run (objective 1 starts to reach a second encoder).

The run is cut into segments of ``--segment`` steps, each in a new process that loads
the previous segment's checkpoint (model, optimizer, calibrator, scaler); a replay runs
all steps in one process without checkpoints. Asserted: every faulty step leaves
parameters, optimizer and calibrator state bit-identical; no state is ever non-finite;
the segmented run equals the replay bit for bit; the resident memory stops growing once
the layout is settled. Printed: the faults injected and survived, time, peak memory.

    python tests/soak.py [--steps 2000] [--segment 400] [--methods bogc,mgda,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

import mmgrad
from mmgrad.methods import BUILTIN, METHODS
from mmgrad.tools.bench_step import M, UCI_DIMS, make_model

NAN_EVERY, OVERFLOW_EVERY, ACCUMULATE_EVERY, BATCH = 97, 89, 5, 32
RAISING = ("bogc", "mimo", "ogm", "mean")  # the others skip: skip_nonfinite=True
OPTIONS = {"ogm": {"modulate": "all"}}  # MLP encoders: every tensor modulated (and noised)


def batch(seed: int, step: int, micro: int = 0):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + micro)
    x = {v: torch.randn(BATCH, d, generator=gen) for v, d in UCI_DIMS.items()}
    return x, torch.randint(0, 10, (BATCH,), generator=gen)


def build(method: str, args) -> tuple:
    model = make_model(args.hidden, args.embed, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cal = mmgrad.FusedCalibrator(model.param_groups(), M, method=method, skip_nonfinite=method not in RAISING,
                                 **OPTIONS.get(method, {})).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=50)
    return model, opt, cal, scaler


def losses_of(model, step: int, total: int, seed: int, micro: int = 0, poison: float = 1.0) -> List[torch.Tensor]:
    x, y = batch(seed, step, micro)
    ls = model.losses(x, y)
    if step >= total // 2:  # the reach change: objective 1 also reaches the second view's encoder
        ls[1] = ls[1] + 0.1 * ls[2]
    ls[1] = ls[1] * poison
    return ls


def snapshot(model, opt, cal) -> tuple:
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(cal.state_dict()))


def identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and (
            torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def finite_state(cal) -> bool:
    def ok(v) -> bool:
        if isinstance(v, torch.Tensor):
            return bool(torch.isfinite(v).all()) if v.is_floating_point() else True
        if isinstance(v, (list, tuple)):
            return all(ok(x) for x in v)
        if isinstance(v, dict):
            return all(ok(x) for x in v.values())
        return True
    return ok(cal.state_dict())


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_steps(method: str, args, first: int, last: int, ckpt_in: Optional[str], ckpt_out: Optional[str]) -> Dict:
    """Steps [first, last) of ``method``; from ``ckpt_in`` if given, into ``ckpt_out``."""
    torch.manual_seed(args.seed)
    model, opt, cal, scaler = build(method, args)
    faults = {"nan_raised": 0, "nan_skipped": 0, "overflow_skipped": 0, "accumulated": 0, "resumed": 0}
    if ckpt_in:
        saved = torch.load(ckpt_in, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        cal.load_state_dict(saved["cal"])
        scaler.load_state_dict(saved["scaler"])
        faults = saved["faults"]
        faults["resumed"] += 1
    rss_settled = None
    for step in range(first, last):
        nan = step % NAN_EVERY == NAN_EVERY - 1
        scaled = step >= args.steps // 4
        overflow = scaled and not nan and step % OVERFLOW_EVERY == OVERFLOW_EVERY - 1
        micro = 2 if step % ACCUMULATE_EVERY == 0 and not (nan or overflow) else 1
        before = snapshot(model, opt, cal) if nan or overflow else None
        use = scaler if scaled and not nan else None  # under a scaler a NaN is an overflow: skipped, never raised
        try:
            if micro == 2:
                with cal.accumulate():
                    cal.backward([0.5 * loss for loss in losses_of(model, step, args.steps, args.seed, 0)], scaler=use)
                faults["accumulated"] += 1
            poison = float("nan") if nan else 1e38 if overflow else 1.0
            cal.backward([(0.5 if micro == 2 else 1.0) * loss
                          for loss in losses_of(model, step, args.steps, args.seed, micro - 1, poison)], scaler=use)
            if use is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        except mmgrad.NonFiniteGradientError:
            assert nan and method in RAISING, f"{method} step {step}: raised without a NaN"
            faults["nan_raised"] += 1
        opt.zero_grad()
        if before is not None:
            after = snapshot(model, opt, cal)
            for what, a, b in zip(("model", "optimizer", "calibrator"), before, after):
                assert identical(a, b), f"{method} step {step}: the faulty step changed the {what} state"
            if nan and method not in RAISING:
                faults["nan_skipped"] += 1
            if overflow:
                faults["overflow_skipped"] += 1
        if step == first + min(100, (last - first) // 2):
            rss_settled = rss_mib()
    assert finite_state(cal), f"{method}: non-finite calibrator state"
    growth = rss_mib() - rss_settled if rss_settled is not None else 0.0
    if ckpt_out:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "cal": cal.state_dict(),
                    "scaler": scaler.state_dict(), "faults": faults}, ckpt_out)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"faults": faults, "params": params, "cal": cal.state_dict(), "rss_growth_mib": growth,
            "peak_rss_mib": rss_mib(), "step_count": cal.step_count}


def segmented(method: str, args, tmp: str) -> Dict:
    """The run cut into segments, each in a new process resuming the last one's checkpoint."""
    ckpt, growth, peak = None, 0.0, 0.0
    for first in range(0, args.steps, args.segment):
        last = min(first + args.segment, args.steps)
        out = os.path.join(tmp, f"{method}-{last}.pt")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(first), str(last), ckpt or "", out,
               *_shared_args(args)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise AssertionError(f"{method}, steps {first}-{last}: the worker failed\n{res.stderr[-3000:]}")
        ckpt = out
        info = json.loads(res.stdout.strip().splitlines()[-1])
        growth, peak = max(growth, info["rss_growth_mib"]), max(peak, info["peak_rss_mib"])
    result = torch.load(out + ".result", weights_only=False)
    result.update(rss_growth_mib=growth, peak_rss_mib=peak)
    return result


def _shared_args(args) -> List[str]:
    return ["--steps", str(args.steps), "--hidden", str(args.hidden), "--embed", str(args.embed), "--seed", str(args.seed),
            "--segment", str(args.segment)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--segment", type=int, default=400, help="steps per process between checkpoints")
    p.add_argument("--methods", default=",".join(sorted(BUILTIN)))
    p.add_argument("--hidden", type=int, default=128, help="the bench model's encoder width (its full size: 2048)")
    p.add_argument("--embed", type=int, default=48, help="the bench model's embedding (its full size: 704)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-growth-mib", type=float, default=64.0, help="resident memory growth allowed per segment")
    p.add_argument("--worker", nargs=5, metavar=("METHOD", "FIRST", "LAST", "CKPT_IN", "CKPT_OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, first, last, ckpt_in, ckpt_out = args.worker
        result = run_steps(method, args, int(first), int(last), ckpt_in or None, ckpt_out)
        torch.save(result, ckpt_out + ".result")
        print(json.dumps({k: result[k] for k in ("rss_growth_mib", "peak_rss_mib")}))
        return 0
    t0 = time.perf_counter()
    model = make_model(args.hidden, args.embed)
    print(f"soak: {args.steps} steps per method, segments of {args.segment} in new processes; bench model at "
          f"hidden={args.hidden}, embed={args.embed} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters), M={M}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="mmgrad-soak-") as tmp:
        for method in args.methods.split(","):
            t1 = time.perf_counter()
            try:
                seg = segmented(method, args, tmp)
                replay = run_steps(method, args, 0, args.steps, None, None)
                assert torch.equal(seg["params"], replay["params"]), f"{method}: segmented run != replay"
                assert identical(seg["cal"], replay["cal"]), f"{method}: calibrator state != replay's"
                assert seg["faults"] == {**replay["faults"], "resumed": seg["faults"]["resumed"]}, (seg["faults"], replay["faults"])
                growth = max(seg["rss_growth_mib"], replay["rss_growth_mib"])
                assert growth <= args.max_growth_mib, f"{method}: resident memory grew {growth:.0f} MiB"
                f = seg["faults"]
                print(f"{method:9s} ok  {time.perf_counter() - t1:6.1f} s  steps committed {seg['step_count']}; "
                      f"NaN raised {f['nan_raised']}, NaN skipped {f['nan_skipped']}, overflows skipped "
                      f"{f['overflow_skipped']}, accumulated steps {f['accumulated']}, resumes {f['resumed']}; "
                      f"peak RSS {max(seg['peak_rss_mib'], replay['peak_rss_mib']):.0f} MiB, growth after "
                      f"warm-up {growth:.1f} MiB; equals the replay bit for bit", flush=True)
            except AssertionError as err:
                failed = True
                print(f"{method:9s} FAILED  {err}", flush=True)
    print(f"soak: {'FAILED' if failed else 'passed'} in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
