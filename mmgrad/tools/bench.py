"""``python -m mmgrad bench``: every method's fused step against a memcpy, the eager
reference, ``torch.compile(reference)`` and TorchJD's aggregator of the same name (mgda,
upgrad, dualproj, pcgrad, cagrad, imtl_g, aligned_mtl, nash_mtl), measured in one
run; a log-log scaling plot; then the end-to-end training step (``bench_step``).

Bytes a fused step must move (fp32 gradients G of shape M x N), by the method's family:
  bogc      read G, read and write the 2 x M x N float32 EMA moments, write N outputs;
  gramian   (mgda, mmpareto) read G twice (the Gram, then the combination: the weights
            depend on the whole Gram), write N;
  weighted  (mimo, mean, ogm) read G once, write N (weights from the losses);
  sum       read G once, write N.
The memcpy baseline reads and writes as many bytes in total; "% of memcpy" is
t_memcpy / t_step. Times are medians after a warm-up; the machine is shared and noisy,
so only ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import ops, reference
from .._constants import MOO_METHODS
from ..methods import BUILTIN
from ..methods import METHODS as REGISTRY
from ..reference.moo import mimo_weights
from . import describe
from .timing import memcpy_seconds, timeit  # noqa: F401 - timeit is the tools' one clock

METHODS = BUILTIN  # the registry's own methods

# Eager/compiled reference only where their float64 temporaries fit in memory.
MAX_REFERENCE_ELEMENTS = 2**25


@dataclass
class Row:
    method: str
    n: int
    m: int
    seconds: float
    gbps: float
    pct_memcpy: float
    x_eager: Optional[float] = None
    x_compile: Optional[float] = None
    compile_seconds: Optional[float] = None
    x_torchjd: Optional[float] = None


@dataclass
class Case:
    """One method at one (M, N): the fused step, the same step in the reference, its inputs."""

    nbytes: int
    fused: Callable[[], object]
    reference: Callable[..., object]  # reference(*inputs); compiled with torch.compile
    inputs: tuple
    torchjd: Optional[Callable[[], object]] = None


#: TorchJD's aggregator for each method it also has (the "x TorchJD" column), from
#: ``torchjd.aggregation`` and M, with mmgrad's defaults where TorchJD has none
TORCHJD_AGGREGATORS: Dict[str, Callable[[ModuleType, int], Callable]] = {
    "mgda": lambda tj, m: tj.MGDA(), "upgrad": lambda tj, m: tj.UPGrad(), "dualproj": lambda tj, m: tj.DualProj(),
    "pcgrad": lambda tj, m: tj.PCGrad(), "imtl_g": lambda tj, m: tj.IMTLG(), "aligned_mtl": lambda tj, m: tj.AlignedMTL(),
    "cagrad": lambda tj, m: tj.CAGrad(c=0.5), "nash_mtl": lambda tj, m: tj.NashMTL(n_tasks=m)}

#: how many times a step of each family (``Method.family``) reads the M x N rows
READS_OF_ROWS = {"bogc": 1, "gramian": 2, "weighted": 1, "sum": 1}


def step_bytes(method: str, m: int, n: int, dtype: torch.dtype = torch.float32) -> int:
    """The bytes ``method``'s fused step must move: its family's reads of the rows, the EMA
    state read and written (bogc), N outputs written."""
    family = REGISTRY[method].family
    s = torch.empty(0, dtype=dtype).element_size()
    state = 2 * 2 * m * n * 4 if family == "bogc" else 0
    return READS_OF_ROWS[family] * m * n * s + state + n * s


def _reference_bogc(g, m_state, v_state):
    return reference.bogc_step(g, m_state, v_state, 5)


def _host_weights(method: str, grams: torch.Tensor) -> torch.Tensor:
    """A Gramian method's weights on the host, with its default options (the methods the
    device solver does not know)."""
    cls = REGISTRY[method]
    return cls(dict(cls.defaults), None).weights(grams.double().cpu(), None).to(grams.device)


def _reference_gramian(method: str):
    def run(g):
        grams = reference.gram(g)[None]
        alpha = reference.moo_weights(grams, method) if method in MOO_METHODS else _host_weights(method, grams)
        return reference.combine(g, alpha[0])
    return run


def _reference_weighted(g, weights):
    return reference.combine(g, weights)


def _reference_sum(g):
    return g.sum(dim=0)


def make_case(method: str, m: int, n: int, backend: str = "cpu", device: str = "cpu") -> Case:
    """What the calibrator runs per step for ``method`` (by its family), on fresh random
    fp32 gradients on ``device``."""
    family = REGISTRY[method].family
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(m, n, generator=gen).to(device)
    out = torch.empty(n, device=device)
    nbytes = step_bytes(method, m, n)
    if family == "bogc":
        st = torch.randn(m, n, generator=gen).to(device)
        vst = st * st + 1.0
        mean_out, var_out = torch.empty_like(st), torch.empty_like(vst)
        fused = lambda: ops.bogc_step(g, st, vst, 5, mean_out=mean_out, var_out=var_out, out=out, backend=backend)
        return Case(nbytes, fused, _reference_bogc, (g, st, vst))
    if family == "gramian":
        def fused():  # Gram kernel, the backend's M x M solve (the host's for the others), combination kernel
            grams = ops.gram(g, backend=backend)[None]
            alpha = (ops.moo_weights(grams, method, backend=backend) if method in MOO_METHODS
                     else _host_weights(method, grams))[0]
            return ops.combine_and_gram(g, alpha, out=out, with_gram=False, backend=backend)

        torchjd = None
        if method in TORCHJD_AGGREGATORS and importlib.util.find_spec("torchjd") is not None:
            import torchjd.aggregation

            try:
                aggregator = TORCHJD_AGGREGATORS[method](torchjd.aggregation, m)
                torchjd = lambda: aggregator(g)
            except ImportError:  # its optional solver (cvxpy, ecos, ...) is not installed: no comparison
                pass
        return Case(nbytes, fused, _reference_gramian(method), (g,), torchjd)
    if family == "weighted":  # one combination; the weights (from the losses) do not change its cost
        losses = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
        weights = mimo_weights(losses).to(device)
        fused = lambda: ops.combine_and_gram(g, weights, out=out, with_gram=False, backend=backend)
        return Case(nbytes, fused, _reference_weighted, (g, weights))
    ones = torch.ones(m, dtype=torch.float64, device=device)  # sum: the same pass with unit weights
    fused = lambda: ops.combine_and_gram(g, ones, out=out, with_gram=False, backend=backend)
    return Case(nbytes, fused, _reference_sum, (g,))


_COMPILED: Dict[str, Callable[..., object]] = {}


def _compiled(method: str, reference_step: Callable[..., object]) -> Callable[..., object]:
    """One ``torch.compile`` per method's reference step, dynamic shapes (recompiles per M)."""
    if method not in _COMPILED:
        _COMPILED[method] = torch.compile(reference_step, dynamic=True)
    return _COMPILED[method]


def bench_method(method: str, m: int, n: int, backend: str = "cpu", compare: bool = True) -> Row:
    case = make_case(method, m, n, backend)
    t = timeit(case.fused)
    row = Row(method, n, m, t, case.nbytes / t / 1e9, 100 * memcpy_seconds(case.nbytes) / t)
    if compare and m * n <= MAX_REFERENCE_ELEMENTS:
        row.x_eager = timeit(lambda: case.reference(*case.inputs), min_time=0.2, min_reps=2) / t
        compiled = _compiled(method, case.reference)
        t0 = time.perf_counter()
        compiled(*case.inputs)
        row.compile_seconds = time.perf_counter() - t0
        row.x_compile = timeit(lambda: compiled(*case.inputs), min_time=0.2, min_reps=2) / t
    if case.torchjd is not None:
        row.x_torchjd = timeit(case.torchjd, min_time=0.2, min_reps=2) / t
    return row


HEADER = (f"{'method':8s} {'N':>6s} {'M':>2s} {'time ms':>9s} {'GB/s':>6s} {'% memcpy':>9s} {'x eager':>8s} "
          f"{'x compile':>9s} {'compile s':>9s} {'x TorchJD':>9s}")


def _cell(x: Optional[float], fmt: str, missing: str = "-") -> str:
    """A measured figure, or ``missing`` where it was not measured."""
    return missing if x is None else format(x, fmt)


def format_row(r: Row) -> str:
    return (f"{r.method:8s} {r.n // 2**20:5d}M {r.m:2d} {1e3 * r.seconds:9.2f} {r.gbps:6.1f} {r.pct_memcpy:8.0f}% "
            f"{_cell(r.x_eager, '8.1f')} {_cell(r.x_compile, '9.2f')} {_cell(r.compile_seconds, '9.1f')} "
            f"{_cell(r.x_torchjd, '9.2f')}")


def markdown_tables(rows: Sequence[Row]) -> str:
    """The kernel tables as ``docs/benchmarks.md`` prints them: one per method, in the
    rows' order, a line per (N, M); the TorchJD column only where TorchJD was timed.

    >>> print(markdown_tables([Row("mgda", 2**20, 2, 1e-3, 20.0, 25.0, 4.0, 3.0, 1.5, 1.2)]))
    **mgda**
    <BLANKLINE>
    | N | M | ms | GB/s | % memcpy | × eager | × compile (compile s) | × TorchJD |
    |---|---|---|---|---|---|---|---|
    | 1 M | 2 | 1.0 | 20.0 | 25 % | 4.0 | 3.0 (1.5) | 1.20 |
    <BLANKLINE>
    """
    f = lambda x, fmt: _cell(x, fmt, "–")  # noqa: E731 - the page's dash
    parts = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        jd = any(r.x_torchjd is not None for r in mine)
        cols = ["N", "M", "ms", "GB/s", "% memcpy", "× eager", "× compile (compile s)"] + (["× TorchJD"] if jd else [])
        lines = [f"**{method}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in mine:
            compiled = "–" if r.x_compile is None else f"{r.x_compile:.1f} ({f(r.compile_seconds, '.1f')})"
            cells = [f"{r.n // 2**20} M", str(r.m), f"{1e3 * r.seconds:.1f}", f"{r.gbps:.1f}", f"{r.pct_memcpy:.0f} %",
                     f(r.x_eager, ".1f"), compiled] + ([f(r.x_torchjd, ".2f")] if jd else [])
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_scaling(rows: Sequence[Row], path: Path) -> None:
    """Log-log: time versus N (one line per method and M), and time versus N*M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, method in enumerate(METHODS):
        for j, m in enumerate(sorted({r.m for r in rows})):
            pts = sorted((r.n, r.seconds) for r in rows if r.method == method and r.m == m)
            if pts:
                left.plot(*zip(*pts), marker="o", color=f"C{i}", alpha=0.4 + 0.3 * j,
                          label=f"{method} M={m}" if j == 1 else None)
        pts = sorted((r.n * r.m, r.seconds) for r in rows if r.method == method)
        if pts:
            right.plot(*zip(*pts), marker="o", ls="none", color=f"C{i}", label=method)
    nm = sorted({r.n * r.m for r in rows})
    if nm:
        t0 = min(r.seconds / (r.n * r.m) for r in rows)
        right.plot([nm[0], nm[-1]], [t0 * nm[0], t0 * nm[-1]], "k--", lw=1, label="slope 1 (linear in N·M)")
    left.set(xscale="log", yscale="log", xlabel="N (parameters)", ylabel="seconds per step", title="time vs N (shade: M)")
    right.set(xscale="log", yscale="log", xlabel="N · M", ylabel="seconds per step", title="time vs N·M")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(f"mmgrad CPU kernels, {torch.get_num_threads()} threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgrad bench", description=describe(__doc__))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--sizes", type=int, nargs="*", default=[1, 16, 64], help="N in units of 2**20 elements")
    p.add_argument("--objectives", type=int, nargs="*", default=[2, 4, 8], help="values of M")
    p.add_argument("--no-compare", action="store_true", help="skip the eager, torch.compile and TorchJD baselines")
    p.add_argument("--plot", type=Path, default=Path("docs/bench_scaling.png"), help="where the log-log PNG goes")
    p.add_argument("--json", type=Path, default=Path("docs/bench.json"), help="where the rows go")
    p.add_argument("--markdown", type=Path, help="also write the kernel tables as docs/benchmarks.md prints them")
    p.add_argument("--skip-kernels", action="store_true", help="only the end-to-end step")
    p.add_argument("--skip-step", action="store_true", help="only the kernel tables")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")  # inductor's own deprecations
    print(f"mmgrad bench: fp32 gradients, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"TorchJD {'present' if importlib.util.find_spec('torchjd') else 'absent (pip install torchjd)'}")
    n_gpu, m_gpu = 100_000_000, 4
    moved = step_bytes("bogc", m_gpu, n_gpu)
    print(f"roofline (a PREDICTION, not a measurement): bogc_step at N=100M, M=4 moves {moved / 1e9:.1f} GB "
          f"-> {1e3 * moved / 3.35e12:.2f} ms at H100's 3.35 TB/s, if the GPU kernels run at memory bandwidth")
    rows: List[Row] = []
    if not args.skip_kernels:
        for method in args.methods:
            print(f"\n{method}\n{HEADER}", flush=True)
            for n in args.sizes:
                for m in args.objectives:
                    rows.append(bench_method(method, m, n * 2**20, compare=not args.no_compare))
                    print(format_row(rows[-1]), flush=True)
        plot_scaling(rows, args.plot)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(f"\nwrote {args.plot} and {args.json}")
        if args.markdown is not None:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown_tables(rows))
            print(f"wrote {args.markdown}")
    if not args.skip_step:
        from .bench_step import main as step_main

        step_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
