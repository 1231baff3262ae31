"""Before/after in one process: the CPU kernels of an earlier build against this tree's.

    python benchmarks/ab_kernels.py PATH/TO/OLD/_C.cpython-311-x86_64-linux-gnu.so [--n N] [--m M ...]

Builds the earlier commit's extension elsewhere (``git worktree add /tmp/before REV``,
``python setup.py build_ext --inplace`` there), loads it beside ``mmgrad._C``, and times
both kernels on the same inputs, alternately, with a memcpy of the same bytes into
memory already touched (``mmgrad.tools.bench.memcpy_seconds``: the warm-up call takes the
page faults). bogc_step moves (5M + 1) N floats: G read, the two EMA rows read and
written, the output written; the Gram reads G once; the combination (with or without the
Gram) reads G and writes the output. Builds before the EMA kept ``mean, var``
(docs/spec.md, decision 3) take the step count and beta instead of the step's weights;
each is called its own way, on the same bytes. ``--n`` (2**24 by default) and ``--m``
(2 4 8) choose the sizes: rows a power-of-two stride apart share cache sets, so an N such
as 2**24 + 10485 shows what the alignment costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys

import torch

from mmgrad.kernels import cpu as K
from mmgrad.reference.bogc import ema_weights
from mmgrad.tools.bench import memcpy_seconds, timeit


def load(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ema_args(ext, step: int = 3, beta: float = 0.9):
    """The EMA arguments ``ext.bogc_step`` takes: ``(step, beta)`` up to mmgrad 0.2, the
    step's weights ``(alpha, 1 - alpha)`` since."""
    old = re.search(r"arg7: (int|typing.SupportsInt)\b", ext.bogc_step.__doc__)
    return (step, beta) if old else ema_weights(step, beta)


def moo_cases(g, alpha, off, out) -> dict:
    """The MOO kernels on float32 rows ``g`` (M x N), as ``name: (bytes moved, call(ext))``:
    the Gram reads G once; the combination, alone or with the next Gram (lagged), reads G
    and writes ``out``."""
    m, n = g.shape
    return {"gram": (m * n * 4, lambda ext: ext.gram(g, off)),
            "combine": ((m + 1) * n * 4, lambda ext: ext.combine(g, alpha, off, out, False)),
            "combine+gram": ((m + 1) * n * 4, lambda ext: ext.combine(g, alpha, off, out, True))}


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the earlier build's mmgrad/_C*.so")
    parser.add_argument("--n", type=int, default=2**24, help="coordinates per row (default 2**24)")
    parser.add_argument("--m", type=int, nargs="+", default=[2, 4, 8], help="objective counts (default 2 4 8)")
    args = parser.parse_args(argv)
    before, after, n = load(args.before), K._extension(), args.n
    print(f"N = {n}, float32, {torch.get_num_threads()} threads; % memcpy = t_memcpy / t_kernel, same bytes, one run")
    print(f"{'kernel':12s} {'M':>2s} {'before ms':>10s} {'after ms':>9s} {'before':>8s} {'after':>8s} {'speed-up':>9s}")
    for m in args.m:
        gen = torch.Generator().manual_seed(m)
        g = torch.randn(m, n, generator=gen)
        state = [torch.rand(m, n, generator=gen) for _ in range(2)]
        raw, off = torch.empty(n), torch.tensor([0, n])
        alpha = torch.full((1, m), 1.0 / m, dtype=torch.float64)
        cases = {
            "bogc_step": ((5 * m + 1) * n * 4,
                          lambda ext: ext.bogc_step(g, state[0], state[1], state[0], state[1], raw, off, *ema_args(ext),
                                                    1.0, 1e-8, 0, 0)),
            **moo_cases(g, alpha, off, raw),
        }
        for name, (nbytes, call) in cases.items():
            t_before = timeit(lambda: call(before))
            t_after = timeit(lambda: call(after))
            t_copy = memcpy_seconds(nbytes)
            print(f"{name:12s} {m:2d} {1e3 * t_before:10.1f} {1e3 * t_after:9.1f} {100 * t_copy / t_before:7.0f}% "
                  f"{100 * t_copy / t_after:7.0f}% {t_before / t_after:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
