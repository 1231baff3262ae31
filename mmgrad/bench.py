"""``python -m mmgrad bench``: kernel throughput against a memcpy, the eager reference and
``torch.compile(reference)``, all measured in the same run.

Bytes moved per step (fp32 gradients, EMA estimator): read the M x N gradients, read
and write the 2 x M x N float32 moments, write the N outputs. The memcpy baseline
copies half that many bytes (so it too reads and writes the same total); "% of memcpy"
is t_memcpy / t_kernel. Times are medians of repeated runs after a warm-up; the machine
is shared and noisy, so only ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import ops, reference

# Eager/compiled reference only where their float64 temporaries fit in memory.
MAX_REFERENCE_ELEMENTS = 2**25


def timeit(fn: Callable[[], object], min_time: float = 0.5, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median seconds per call of ``fn`` after one warm-up call."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_seconds(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return timeit(lambda: dst.copy_(src))


@dataclass
class Row:
    method: str
    n: int
    m: int
    seconds: float
    gbps: float
    pct_memcpy: float
    x_eager: Optional[float]
    x_compile: Optional[float]
    compile_seconds: Optional[float]


def _bogc_inputs(m: int, n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(m, n, generator=gen).to(dtype)
    st = torch.randn(m, n, generator=gen)
    return g, st, st * st + 1.0


def bogc_bytes(m: int, n: int, dtype: torch.dtype) -> int:
    s = torch.empty(0, dtype=dtype).element_size()
    return m * n * s + 2 * 2 * m * n * 4 + n * s


def bench_bogc(m: int, n: int, dtype: torch.dtype = torch.float32, backend: str = "cpu", compare: bool = True) -> Row:
    g, mst, vst = _bogc_inputs(m, n, dtype)
    m_out, v_out, out = torch.empty_like(mst), torch.empty_like(vst), torch.empty(n, dtype=dtype)
    kern = lambda: ops.bogc_step(g, mst, vst, 5, m_out=m_out, v_out=v_out, out=out, backend=backend)
    t = timeit(kern)
    nbytes = bogc_bytes(m, n, dtype)
    t_copy = memcpy_seconds(nbytes)
    x_eager = x_comp = t_compile = None
    if compare and m * n <= MAX_REFERENCE_ELEMENTS:
        eager = lambda: reference.bogc_step(g, mst, vst, 5)
        x_eager = timeit(eager, min_time=0.2, min_reps=2) / t
        compiled = _compiled_reference()
        t0 = time.perf_counter()
        compiled(g, mst, vst, 5)
        t_compile = time.perf_counter() - t0
        x_comp = timeit(lambda: compiled(g, mst, vst, 5), min_time=0.2, min_reps=2) / t
    return Row("bogc", n, m, t, nbytes / t / 1e9, 100 * t_copy / t, x_eager, x_comp, t_compile)


_COMPILED = None


def _compiled_reference():
    """One ``torch.compile`` of the reference step with dynamic shapes (recompiles per M)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(reference.bogc_step, dynamic=True)
    return _COMPILED


def format_rows(rows: Sequence[Row]) -> str:
    f = lambda x, fmt: "-" if x is None else format(x, fmt)
    lines = [f"{'method':8s} {'N':>6s} {'M':>2s} {'time ms':>9s} {'GB/s':>6s} {'% memcpy':>9s} {'x eager':>8s} {'x compile':>9s} {'compile s':>9s}"]
    for r in rows:
        lines.append(f"{r.method:8s} {r.n // 2**20:5d}M {r.m:2d} {1e3 * r.seconds:9.2f} {r.gbps:6.1f} {r.pct_memcpy:8.0f}% "
                     f"{f(r.x_eager, '8.1f')} {f(r.x_compile, '9.2f')} {f(r.compile_seconds, '9.1f')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgrad bench", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1, 4, 16, 64], help="N in units of 2**20 elements")
    p.add_argument("--objectives", type=int, nargs="*", default=[2, 4, 8], help="values of M")
    p.add_argument("--no-compare", action="store_true", help="skip the eager and torch.compile baselines")
    args = p.parse_args(argv)
    print(f"mmgrad bench: bogc_step (EMA, fp32 grads), {torch.get_num_threads()} threads, torch {torch.__version__}")
    n_gpu, m_gpu = 100_000_000, 4
    moved = bogc_bytes(m_gpu, n_gpu, torch.float32)
    print(f"roofline (a PREDICTION, not a measurement): bogc_step at N=100M, M=4 moves {moved / 1e9:.1f} GB "
          f"-> {1e3 * moved / 3.35e12:.2f} ms at H100's 3.35 TB/s, if the GPU kernels run at memory bandwidth")
    print(format_rows([]))  # the header; each row prints as it is measured
    for n in args.sizes:
        for m in args.objectives:
            print(format_rows([bench_bogc(m, n * 2**20, compare=not args.no_compare)]).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
