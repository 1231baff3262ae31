"""What a power-of-two row length costs the CPU kernels: each kernel at N = 2**k and at
N = 2**k + 10485, against a memcpy of the same bytes, in one process.

    python benchmarks/row_alignment.py [--m 8] [--log2 24 25 26]

The M x N gradient rows lie N floats apart. When N * 4 bytes is a multiple of 4 KiB the
rows share L1 sets; when it is a large power of two they also share whatever the memory
system maps by the higher address bits. An offset of 10485 floats (not a multiple of
16) breaks both, and costs 0.06 % more bytes: a kernel that is bound by the bytes
alone takes the same time at both.
"""

from __future__ import annotations

import argparse

import torch
from ab_kernels import moo_cases  # beside this script (sys.path[0])

from mmgrad.kernels import cpu as K
from mmgrad.tools.timing import memcpy_seconds, timeit

OFFSET = 10485


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=8, help="objectives (default 8)")
    parser.add_argument("--log2", type=int, nargs="+", default=[24, 25, 26], help="N = 2**k (default 24 25 26)")
    args = parser.parse_args(argv)
    ext, m = K._extension(), args.m
    print(f"M = {m}, float32, {torch.get_num_threads()} threads; % memcpy = t_memcpy / t_kernel, same bytes")
    print(f"{'N':>10s} {'kernel':12s} {'ms':>8s} {'memcpy ms':>10s} {'% memcpy':>9s}")
    for k in args.log2:
        for n in (2**k, 2**k + OFFSET):
            gen = torch.Generator().manual_seed(k)
            g = torch.randn(m, n, generator=gen)
            out, off = torch.empty(n), torch.tensor([0, n])
            alpha = torch.full((1, m), 1.0 / m, dtype=torch.float64)
            for name, (nbytes, call) in moo_cases(g, alpha, off, out).items():
                t, t_copy = timeit(lambda: call(ext)), memcpy_seconds(nbytes)
                print(f"{n:10d} {name:12s} {1e3 * t:8.1f} {1e3 * t_copy:10.1f} {100 * t_copy / t:8.0f}%", flush=True)
            del g, out
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
