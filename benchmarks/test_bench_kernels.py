"""pytest-benchmark microbenchmarks, one per op (``make bench-pytest``).

Times only; the table with GB/s, % of memcpy and the eager/compile ratios comes from
``python -m mmgrad bench`` (the README quotes it).
"""

from __future__ import annotations

import pytest
import torch

from mmgrad import ops

N = 2**22


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda m: f"M{m}")
def inputs(request):
    m = request.param
    g = torch.randn(m, N)
    st = torch.randn(m, N)
    return g, st, st * st + 1.0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bogc_step(benchmark, inputs, backend):
    if backend == "cpu" and not __import__("mmgrad").backends()["cpu"].available:
        pytest.skip("C++ extension not built")
    g, m, v = inputs
    outs = dict(m_out=torch.empty_like(m), v_out=torch.empty_like(v), out=torch.empty(N)) if backend == "cpu" else {}
    benchmark(lambda: ops.bogc_step(g, m, v, 5, backend=backend, **outs))


def test_gram(benchmark, inputs):
    benchmark(lambda: ops.gram(inputs[0]))


def test_combine(benchmark, inputs):
    g = inputs[0]
    alpha = torch.full((g.shape[0],), 1.0 / g.shape[0], dtype=torch.float64)
    out = torch.empty(N)
    benchmark(lambda: ops.combine_and_gram(g, alpha, out=out, with_gram=False))


def test_memcpy_same_bytes_as_bogc(benchmark, inputs):
    """The yardstick: a copy that reads and writes as many bytes as bogc_step moves."""
    from mmgrad.bench import bogc_bytes

    nbytes = bogc_bytes(inputs[0].shape[0], N, torch.float32)
    src = torch.ones(nbytes // 2, dtype=torch.uint8)
    dst = torch.empty_like(src)
    benchmark(lambda: dst.copy_(src))
