"""``make mutate``: switch off each option and documented feature in turn, in a copy of
the package, and show that some test fails.

Each mutation replaces a piece of source (every occurrence of it, which must exist) in
a fresh copy of ``mmgrad/`` and ``tests/``, then runs the suite's fast tests there with
``-x`` (the Triton interpreter's copies of the same tests are left out for time). The
mutation is *caught* when a test fails, *survived* when all pass, and *broken* when
pytest could not run (a bad mutation, reported as such). The score is caught / total;
the exit status is 1 if any survived or broke.

    python tests/mutate.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: The tests a mutation must fail, fastest-to-fail first (``-x`` stops at the first).
TESTS = ["tests/test_options.py", "tests/test_pytorch_habits.py", "tests/test_calibrator.py", "tests/test_layout.py",
         "tests/test_ogm.py", "tests/test_errors.py", "tests/test_properties.py", "tests/test_dcp.py",
         "tests/test_norm_matching.py", "tests/test_kernels_cpu.py", "tests/test_weighting.py",
         "tests/test_faithful.py", "tests/test_gramian_baselines.py", "tests/test_device_dual_cone.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str
    new: str


MUTATIONS = [
    # --- options
    Mutation("bogc ignores beta", "mmgrad/methods/_bogc.py", 'beta=o["beta"]', "beta=0.9"),
    Mutation("bogc ignores gamma", "mmgrad/methods/_bogc.py", 'gamma=o["gamma"]', "gamma=1.0"),
    Mutation("bogc ignores eps", "mmgrad/methods/_bogc.py", 'eps=o["eps"]', "eps=1e-8"),
    Mutation("bogc ignores confidence", "mmgrad/methods/_bogc.py", 'confidence=o["confidence"]', 'confidence="belief"'),
    Mutation("bogc ignores weights", "mmgrad/methods/_bogc.py", 'weights=o["weights"]', 'weights="belief"'),
    Mutation("bogc ignores rescale", "mmgrad/methods/_bogc.py", 'if o["rescale"]:', "if True:"),
    Mutation("mgda ignores normalize", "mmgrad/methods/_moo.py", 'normalize=self.options["normalize"], losses=loss',
             'normalize="none", losses=None'),
    Mutation("lagged is ignored", "mmgrad/methods/_weighting.py",
             'lagged, by = ctx.layout, self.options["lagged"], self.scope', "lagged, by = ctx.layout, False, self.scope"),
    Mutation("mmpareto ignores magnitude", "mmgrad/methods/_moo.py", 'magnitude=self.options["magnitude"]',
             "magnitude=1.5"),
    Mutation("mmpareto's per-tensor rule ignores magnitude", "mmgrad/methods/_moo.py",
             'shares * boost[:, None] * self.options["magnitude"]', "shares * boost[:, None] * 1.5"),
    Mutation("mimo ignores rho", "mmgrad/methods/_weighted.py", 'rho, tau = self.options["rho"], self.options["tau"]',
             'rho, tau = 1.0, self.options["tau"]'),
    Mutation("mimo ignores tau", "mmgrad/methods/_weighted.py", 'rho, tau = self.options["rho"], self.options["tau"]',
             'rho, tau = self.options["rho"], 1.0'),
    Mutation("ogm ignores alpha", "mmgrad/methods/_ogm.py", 'self.options["alpha"])', "0.5)"),
    Mutation("ogm modulates every tensor", "mmgrad/methods/_ogm.py", 'options["modulate"] == "all" or p.dim() == 4',
             "True"),
    Mutation("ogm's noise from the group's spread", "mmgrad/methods/_ogm.py",
             'if o["noise"] and o["noise_std"] == "tensor" else None', "if False else None"),
    Mutation("ogm ignores the scores", "mmgrad/methods/_ogm.py",
             "if ctx.scores is not None:\n            return ogm_coefficients_from_scores", "if False:\n            return ogm_coefficients_from_scores"),
    Mutation("ogm ignores unimodal", "mmgrad/methods/_ogm.py", '+= float(o["unimodal"])', "+= 0.0"),
    Mutation("ogm ignores noise", "mmgrad/methods/_ogm.py", 'if o["noise"]:', "if False:"),
    Mutation("ogm ignores seed", "mmgrad/methods/_ogm.py", 'ge_noise(self.options["seed"], step,', "ge_noise(0, step,"),
    Mutation("ogm noise not keyed by the committed step", "mmgrad/methods/_ogm.py", "step = ctx.steps + 1", "step = 1"),
    Mutation("skip_nonfinite raises instead", "mmgrad/calibrator.py", 'if self.options["skip_nonfinite"]:', "if False:"),
    # --- the step's phases and .grad
    Mutation("backward does not calibrate", "mmgrad/calibrator.py",
             "between backward and step see it\n            self.step()", "between backward and step see it\n            pass"),
    Mutation("accumulate() does not defer", "mmgrad/calibrator.py", "        if not self._accumulating:\n            # .grad",
             "        if True:\n            # .grad"),
    Mutation("a second backward before the step is not refused", "mmgrad/calibrator.py",
             'if self._phase in ("calibrated", "skipped") and self._hook is not None:', "if False:"),
    Mutation(".grad of earlier steps is dropped", "mmgrad/calibrator.py",
             "p.grad = prior.add_(p.grad) if p.grad is not None else prior", "pass"),
    Mutation("a parameter frozen later still gets .grad", "mmgrad/calibrator.py",
             "p.grad = view if p.requires_grad else None", "p.grad = view"),
    Mutation("a GradScaler's scale is not undone", "mmgrad/calibrator.py", "1.0 / (scale * world))", "1.0 / world)"),
    Mutation("the optimizer runs a skipped step", "mmgrad/calibrator.py",
             '        if self._phase == "skipped":\n            for group in optimizer.param_groups:',
             '        if False:\n            for group in optimizer.param_groups:'),
    Mutation("a step without backward passes", "mmgrad/calibrator.py", "if not any(bool(g.any()) for g in grads):",
             "if True:"),
    Mutation("a DCP checkpoint drops the lagged weights", "mmgrad/checkpoint.py", 'if state.get("has_prev_alpha"):',
             "if False:"),
    # --- layout and names
    Mutation("rows for every objective (reach ignored)", "mmgrad/collect.py", "reach[i].add(objective)",
             "reach[i].update(range(m))"),
    Mutation("errors number named parameters", "mmgrad/params.py", 'if name:\n        return f"{name!r}', 'if False:\n        return f"{name!r}'),
    Mutation("unfreezing is not warned about", "mmgrad/calibrator.py", "            if names:\n                warnings.warn(",
             "            if False:\n                warnings.warn("),
    Mutation("a named backend without a kernel runs the reference", "mmgrad/ops.py", 'if backend != "auto":',
             "if False:"),
    Mutation("a method's declared kernels and limits are not checked", "mmgrad/calibrator.py", "        if why_not:\n",
             "        if False:\n"),
    Mutation("mmpareto's magnitude rule per group, not per tensor", "mmgrad/methods/_moo.py",
             'def scope(self) -> str:\n        return self.options["scope"]', 'def scope(self) -> str:\n        return "group"'),
    Mutation("upgrad and dualproj ignore their options", "mmgrad/methods/_dual_cone.py",
             'return {k: self.options[k] for k in ("pref_vector", "norm_eps", "reg_eps")}', "return {}"),
    Mutation("aligned_mtl ignores scale_mode", "mmgrad/methods/_aligned_mtl.py", 'scale_mode=self.options["scale_mode"])',
             'scale_mode="min")'),
    Mutation("pcgrad ignores seed", "mmgrad/methods/_pcgrad.py", 'seed=self.options["seed"], step=step)', "seed=0, step=step)"),
    Mutation("pcgrad's orders ignore the step", "mmgrad/methods/_pcgrad.py", "self._weights_on_step(grams, int(ctx.steps) + 1)",
             "self._weights_on_step(grams, 1)"),
    Mutation("cagrad ignores c", "mmgrad/methods/_cagrad.py", 'c=o["c"],', "c=0.5,"),
    Mutation("cagrad ignores rescale", "mmgrad/methods/_cagrad.py", 'rescale=o["rescale"],', "rescale=1,"),
    Mutation("nash_mtl ignores max_norm", "mmgrad/methods/_nash_mtl.py", 'max_norm=self.options["max_norm"])',
             "max_norm=1.0)"),
    Mutation("nash_mtl stops after one Newton step", "mmgrad/reference/gramian.py", "        if dec < tol:\n",
             "        if True:\n"),
    Mutation("a sync-free dual-cone step solves on the host", "mmgrad/methods/_dual_cone.py",
             'if ctx.sync_free and implements(ctx.ops, "dual_cone_weights"):', "if False:"),
    Mutation("the device dual-cone solve skips its face solves", "mmgrad/kernels/triton_dual_cone.py",
             "return tl.maximum(tl.where(done == 1.0, xc, x), 0.0)", "return tl.maximum(x, 0.0)"),
    Mutation("the cpu backend solves with the reference", "mmgrad/kernels/cpu.py",
             "return _extension().moo_weights_device(grams.to(torch.float64).contiguous(), *codes)",
             "from ..reference.moo import moo_weights as host\n    return host(grams, method, normalize=normalize, "
             "losses=losses, magnitude=magnitude)"),
]


def mutated(root: Path, m: Mutation) -> str:
    """``m.path`` under ``root`` with the mutation applied; ValueError if it no longer matches."""
    text = (root / m.path).read_text()
    if m.old not in text:
        raise ValueError(f"mutation {m.name!r}: {m.old!r} is not in {m.path}; update tests/mutate.py")
    return text.replace(m.old, m.new)


def run(m: Mutation, timeout: int) -> tuple:
    with tempfile.TemporaryDirectory(prefix="mmgrad-mutant-") as tmp:
        root = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "mmgrad", root / "mmgrad", ignore=ignore)
        shutil.copytree(ROOT / "tests", root / "tests", ignore=ignore)
        (root / m.path).write_text(mutated(root, m))
        env = {**os.environ, "PYTHONPATH": str(root), "MMGRAD_QUIET": "1"}
        where = subprocess.run([sys.executable, "-c", "import mmgrad; print(mmgrad.__file__)"], cwd=root, env=env,
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(root)):  # an installed mmgrad must not shadow the mutant
            return "broken", f"the tests would import {where}, not the mutated copy", 0.0
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "not triton", *TESTS]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "broken", f"timed out after {timeout} s", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        lines = res.stdout.strip().splitlines()
        failed = next((line for line in lines if line.startswith("FAILED")), lines[-1] if lines else res.stderr[-300:])
        if res.returncode == 1:
            return "caught", failed, seconds
        if res.returncode == 0:
            return "survived", lines[-1] if lines else "", seconds
        return "broken", (res.stdout + res.stderr)[-500:], seconds


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/mutate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="run the mutations whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=int, default=600, help="seconds per mutation")
    args = p.parse_args(argv)
    chosen: List[Mutation] = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path})")
        return 0
    try:  # every mutation applies to the code as it is, before anything runs
        for m in chosen:
            mutated(ROOT, m)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    counts = {"caught": 0, "survived": 0, "broken": 0}
    t_all = time.perf_counter()
    for m in chosen:
        verdict, detail, seconds = run(m, args.timeout)
        counts[verdict] += 1
        print(f"{verdict:8s} {seconds:6.1f} s  {m.name}: {detail.strip().splitlines()[-1] if detail.strip() else ''}",
              flush=True)
    total = len(chosen)
    print(f"\nmutation score: {counts['caught']}/{total} caught, {counts['survived']} survived, {counts['broken']} broken "
          f"({time.perf_counter() - t_all:.0f} s; python {sys.version.split()[0]})")
    return 0 if counts["caught"] == total else 1


if __name__ == "__main__":
    sys.exit(main())
