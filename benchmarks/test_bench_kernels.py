"""pytest-benchmark microbenchmarks, one per method's step (``make bench-pytest``).

Times only; the tables with GB/s, % of memcpy and the eager/compile/TorchJD ratios come
from ``python -m mmgrad bench`` (the README quotes them).
"""

from __future__ import annotations

import pytest
import torch

import mmgrad
from mmgrad.tools.bench import METHODS, make_case, step_bytes

N = 2**22
needs_cpu = pytest.mark.skipif(not mmgrad.backends()["cpu"].available, reason="C++ extension not built")


@pytest.mark.parametrize("m", [2, 4, 8], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("method", METHODS)
@needs_cpu
def test_fused_step(benchmark, method, m):
    benchmark(make_case(method, m, N).fused)


@pytest.mark.parametrize("method", METHODS)
def test_reference_step(benchmark, method):
    case = make_case(method, 4, N, backend="reference")
    benchmark(lambda: case.reference(*case.inputs))


@pytest.mark.parametrize("method", METHODS)
def test_memcpy_same_bytes(benchmark, method):
    """The yardstick: a copy that reads and writes as many bytes as the M=4 step moves."""
    src = torch.ones(step_bytes(method, 4, N) // 2, dtype=torch.uint8)
    dst = torch.empty_like(src)
    benchmark(lambda: dst.copy_(src))
