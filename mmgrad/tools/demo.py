"""``python -m mmgrad demo``: what each method does to modality imbalance, against controls.

Four tasks: the UCI multiple-features digits with views fac, fou, zer, mor (one strong,
three weak), with all six, and with the four views on a 5 % training split (100 digits,
where the strong view does not saturate), and a synthetic task whose weak views hold the parts of the
label the strong one lacks (``mmgrad.training.data.complementary_multiview``, configured
in ``TASKS``), where under-training them must cost fused accuracy. Every method trains a
LateFusion model (or I2M2) with the same protocol:

1. tuning on seed 0's validation split, the same budget of 3 trials per method: methods
   without a knob try 3 learning rates; the others keep the summed baseline's best
   learning rate and try 3 values of their own knob (bogc: confidence mode);
2. 5 seeds (each its own stratified split and initialisation) with the chosen settings,
   reported on the test split as mean +- std, and compared seed by seed ("better"/"worse"
   when the mean paired difference exceeds twice its standard error, else "no
   difference") with its **control** — the same model trained on the same objectives,
   summed (``CONTROLS``) — and with the LateFusion sum.

Writes a table to stdout, and ``demo.json`` (every number) and ``demo.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import describe

# task -> (data set, views, its split fractions); each configuration is fixed here, before any
# comparison. The 5 % split (100 training digits): the strong view no longer saturates,
# so how much the weak views are trained can show in fused accuracy.
UCI_SPLIT = (0.6, 0.2, 0.2)
TASKS = {"UCI, 4 views (fac fou zer mor)": ("uci", ("fac", "fou", "zer", "mor"), UCI_SPLIT),
         "UCI, all 6 views": ("uci", ("fac", "fou", "kar", "mor", "pix", "zer"), UCI_SPLIT),
         "UCI, 4 views, 5 % training split": ("uci", ("fac", "fou", "zer", "mor"), (0.05, 0.15, 0.8)),
         "complementary synthetic, 3 views": ("complementary", ("v0", "v1", "v2"), None)}
LEARNING_RATES = (0.02, 0.05, 0.1)
# method -> (model, calibrator method or None, objectives without calibrator, the knob and its 3 values)
METHODS: Dict[str, Tuple[str, Optional[str], str, Optional[Tuple[str, Tuple]]]] = {
    "fused only": ("late", None, "fused", None),
    "fused + unimodal (sum)": ("late", None, "all", None),
    "bogc": ("late", "bogc", "all", ("confidence", ("belief", "certainty", "none"))),
    "bogc (sample est.)": ("late", "bogc-sample", "all", ("confidence", ("belief", "certainty", "none"))),
    "mgda": ("late", "mgda", "all", ("normalize", ("none", "l2", "loss"))),
    "mmpareto": ("late", "mmpareto", "all", ("magnitude", (1.0, 1.5, 2.0))),
    "mimo": ("late", "mimo", "all", ("rho", (0.5, 1.0, 2.0))),
    "ogm-ge": ("late", "ogm", "all", ("alpha", (0.1, 0.5, 1.0))),
    "i2m2": ("i2m2", None, "fused", None),
    "i2m2 (sum)": ("i2m2", None, "all", None),
    "i2m2 + bogc": ("i2m2", "bogc", "all", ("confidence", ("belief", "certainty", "none"))),
}
# options a row always takes: the views here are feature vectors and the encoders MLPs, so
# OGM-GE's official rule (modulate the convolution weights, scored by the fused head's
# split logits) has nothing to act on; the row runs mmgrad's variant (every encoder tensor,
# the views' own losses as scores, the group's spread for GE)
FIXED_OPTIONS: Dict[str, Dict[str, object]] = {"ogm-ge": {"modulate": "all", "noise_std": "group"}}
BASELINE = "fused + unimodal (sum)"
# each calibrated row's control: the same model on the same objectives, summed
CONTROLS = {m: ("i2m2 (sum)" if spec[0] == "i2m2" else BASELINE) for m, spec in METHODS.items() if spec[1] is not None}


@dataclass
class Job:
    task: str
    views: Tuple[str, ...]
    method: str  # a METHODS key or "alone:<view>"
    lr: float
    knob: Optional[Tuple[str, object]]
    seed: int
    epochs: int
    optimizer: str
    test: bool = False
    strongest: Optional[str] = None


@dataclass
class Result:
    job: Job
    val_accuracy: float
    seconds: float
    test: Dict[str, object] = field(default_factory=dict)
    weights: List[List[float]] = field(default_factory=list)
    uncertainty: List[float] = field(default_factory=list)


def run_job(job: Job) -> Result:
    """Train one configuration on one seed (in a worker process)."""
    import mmgrad
    from mmgrad.training.data import complementary_multiview, select_views, uci_digits
    from mmgrad.training.models import I2M2, LateFusion
    from mmgrad.training.train import evaluate, fit

    torch.set_num_threads(1)
    os.environ.setdefault("MMGRAD_QUIET", "1")
    t0 = time.perf_counter()
    alone = job.method.startswith("alone:")
    views = (job.method.split(":", 1)[1],) if alone else job.views
    kind_of_data, _, fractions = TASKS[job.task]
    data = (uci_digits(views, seed=job.seed, fractions=fractions) if kind_of_data == "uci"
            else select_views(complementary_multiview(seed=job.seed), views))
    torch.manual_seed(job.seed)
    kind, cal_method, objectives, _ = ("late", None, "fused", None) if alone else METHODS[job.method]
    model = (I2M2 if kind == "i2m2" else LateFusion)(data.dims, data.num_classes)
    if job.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=job.lr / 20, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=0.9, weight_decay=1e-4)
    cal = None
    if cal_method is not None:
        options = {**FIXED_OPTIONS.get(job.method, {}), **(dict([job.knob]) if job.knob else {})}
        if cal_method == "bogc-sample":
            cal_method, options["estimator"] = "bogc", "sample"
        cal = mmgrad.FusedCalibrator(model.param_groups(), 1 + len(views), method=cal_method, **options).attach(opt)
    hist = fit(model, data, opt, cal, objectives=objectives, epochs=job.epochs, batch_size=128, patience=10, seed=job.seed, progress=False)
    res = Result(job, hist.best_val_accuracy, 0.0, weights=hist.weights, uncertainty=hist.uncertainty)
    if job.test:
        res.test = evaluate(model, data, "test", strongest=None if alone else job.strongest)
    res.seconds = time.perf_counter() - t0
    return res


def _run_all(jobs: Sequence[Job], workers: int, label: str) -> List[Result]:
    from tqdm.auto import tqdm

    if workers <= 1:
        return [run_job(j) for j in tqdm(jobs, desc=label, leave=False)]
    with mp.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(run_job, jobs), total=len(jobs), desc=label, leave=False))


def _trials(method: str, base_lr: float, quick: bool) -> List[Tuple[float, Optional[Tuple[str, object]]]]:
    knob = None if method.startswith("alone:") else METHODS[method][3]
    trials = [(base_lr, (knob[0], v)) for v in knob[1]] if knob else [(lr, None) for lr in LEARNING_RATES]
    return trials[:1] if quick else trials


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _verdict(diffs: Sequence[float]) -> str:
    if len(diffs) < 2:
        return "n/a (1 seed)"
    m, s = _mean_std(diffs)
    se = s / math.sqrt(len(diffs))
    if m > 2 * se and m > 0:
        return "better"
    if m < -2 * se and m < 0:
        return "worse"
    return "no difference"


def run_view_set(name: str, views: Tuple[str, ...], args) -> dict:
    methods = [*METHODS, *(f"alone:{v}" for v in views)]
    knobless = [m for m in methods if m.startswith("alone:") or METHODS[m][3] is None]
    mk = lambda m, lr, knob, seed, test=False, strongest=None: Job(name, views, m, lr, knob, seed, args.epochs, args.optimizer, test, strongest)
    # 1. tuning: learning rates first (knobless methods), then the knobs at the baseline's rate
    tuned: Dict[str, Result] = {}
    first = _run_all([mk(m, lr, kn, 0) for m in knobless for lr, kn in _trials(m, 0.0, args.quick)], args.workers, f"{name}: tuning lr")
    for r in first:
        if r.job.method not in tuned or r.val_accuracy > tuned[r.job.method].val_accuracy:
            tuned[r.job.method] = r
    base_lr = tuned[BASELINE].job.lr
    rest = [m for m in methods if m not in knobless]
    for r in _run_all([mk(m, lr, kn, 0) for m in rest for lr, kn in _trials(m, base_lr, args.quick)], args.workers, f"{name}: tuning knobs"):
        if r.job.method not in tuned or r.val_accuracy > tuned[r.job.method].val_accuracy:
            tuned[r.job.method] = r
    strongest = max(views, key=lambda v: tuned[f"alone:{v}"].val_accuracy)
    # 2. the chosen settings on every seed, on the test split
    final = _run_all([mk(m, tuned[m].job.lr, tuned[m].job.knob, s, True, strongest) for m in methods for s in range(args.seeds)], args.workers, f"{name}: {args.seeds} seeds")
    by_method: Dict[str, List[Result]] = {}
    for r in final:
        by_method.setdefault(r.job.method, []).append(r)
    def paired(m: str, other: str, key: str = "fused") -> str:
        """The seed-by-seed verdict of m against other on the test metric key."""
        theirs = {r.job.seed: float(r.test[key]) for r in by_method[other] if key in r.test}
        return _verdict([float(r.test[key]) - theirs[r.job.seed] for r in by_method[m] if key in r.test and r.job.seed in theirs])

    rows = {}
    for m, rs in by_method.items():
        fused = [float(r.test["fused"]) for r in rs]
        weak = [sum(r.test["probe"][v] for v in views if v != strongest) / (len(views) - 1) for r in rs] if not m.startswith("alone:") else []
        without = [float(r.test["without_strongest"]) for r in rs if "without_strongest" in r.test]
        rows[m] = {
            "setting": {"lr": tuned[m].job.lr, **({tuned[m].job.knob[0]: tuned[m].job.knob[1]} if tuned[m].job.knob else {})},
            "fused": _mean_std(fused),
            "weak_probe": _mean_std(weak) if weak else None,
            "without_strongest": _mean_std(without) if without else None,
            "probe": {v: _mean_std([r.test["probe"][v] for r in rs]) for v in rs[0].test["probe"]},
            "vs_sum": paired(m, BASELINE) if m != BASELINE else "(baseline)",
            "vs_control": paired(m, CONTROLS[m]) if m in CONTROLS else "",
            "control": CONTROLS.get(m, ""),
            "without_vs_control": paired(m, CONTROLS[m], "without_strongest") if m in CONTROLS and without else "",
            "per_seed_fused": fused,
            "seconds": sum(r.seconds for r in rs) / len(rs),
            "history_seed0": {"weights": rs[0].weights, "uncertainty": rs[0].uncertainty},
        }
    return {"views": views, "strongest": strongest, "methods": rows}


def format_table(name: str, res: dict) -> str:
    pct = lambda ms: "     -      " if ms is None else f"{100 * ms[0]:5.1f} ± {100 * ms[1]:3.1f}"
    lines = [f"\n== {name}: strongest view {res['strongest']!r} (by single-view validation accuracy) ==",
             f"{'method':26s} {'fused acc %':>12s} {'weak-view probe %':>18s} {'w/o strongest %':>16s}  "
             f"{'vs control':14s} {'w/o str. vs ctl':15s} {'vs late sum':14s} setting"]
    for m, r in res["methods"].items():
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        lines.append(f"{m:26s} {pct(r['fused']):>12s} {pct(r['weak_probe']):>18s} {pct(r['without_strongest']):>16s}  "
                     f"{r['vs_control'] or '-':14s} {r['without_vs_control'] or '-':15s} {r['vs_sum']:14s} {setting}")
    return "\n".join(lines)


def format_markdown(name: str, res: dict) -> str:
    """The table as docs/demo.md prints it."""
    pct = lambda ms: "–" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = [f"**{name}: strongest view {res['strongest']!r} (by single-view validation accuracy)**", "",
             "| method | fused acc % | weak-view probe % | w/o strongest % | vs its control (fused / w/o strongest) "
             "| vs LateFusion sum | chosen setting |", "|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        versus = (f"{r['vs_control']} / {r['without_vs_control']} (vs {CONTROLS[m]})" if r["vs_control"] else "–")
        lines.append(f"| {m} | {pct(r['fused'])} | {pct(r['weak_probe'])} | {pct(r['without_strongest'])} | {versus} "
                     f"| {r['vs_sum']} | {setting} |")
    return "\n".join(lines)


def plot(results: Dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(7 * len(names), 9), squeeze=False)
    for col, name in enumerate(names):
        rows = results[name]["methods"]
        ms = list(rows)
        ax = axes[0, col]
        x = range(len(ms))
        for shift, key, label in ((-0.27, "fused", "fused test acc"), (0.0, "without_strongest", "fused acc w/o strongest view"),
                                  (0.27, "weak_probe", "weak-view probe acc")):
            ax.bar([i + shift for i in x], [100 * (rows[m][key] or (math.nan, 0))[0] for m in ms], 0.27,
                   yerr=[100 * (rows[m][key] or (0, 0))[1] for m in ms], label=label)
        ax.set_xticks(list(x), ms, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(name)
        ax.legend(fontsize=8)
        ax = axes[1, col]
        for m in ("bogc", "mgda", "mmpareto", "mimo", "ogm-ge"):
            w = rows.get(m, {}).get("history_seed0", {}).get("weights")
            if w:
                ax.plot([row[0] for row in w], label=f"{m}: fused-objective share")
        unc = rows.get("bogc", {}).get("history_seed0", {}).get("uncertainty")
        if unc:
            ax.plot(unc, "k--", label="bogc: mean fused uncertainty")
        ax.set_xlabel("epoch")
        ax.set_ylabel("share / uncertainty")
        ax.set_title("per-objective weight of the fused loss, seed 0")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgrad demo", description=describe(__doc__))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="SGD with momentum 0.9 (default, as the balancing papers) or AdamW (lr/20)")
    p.add_argument("--tasks", nargs="*", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 1 trial per method: a smoke test")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown (docs/demo.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for name in args.tasks:
        results[name] = run_view_set(name, TASKS[name][1], args)
        print(format_markdown(name, results[name]) if args.markdown else format_table(name, results[name]), flush=True)
    elapsed = time.perf_counter() - t0
    meta = {"seeds": args.seeds, "epochs": args.epochs, "optimizer": args.optimizer, "seconds": elapsed, "torch": torch.__version__}
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "demo.png"))
    print(f"\n{elapsed:.0f} s; wrote {args.out}/demo.json and {args.out}/demo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
