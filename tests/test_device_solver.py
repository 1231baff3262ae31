"""The MOO solver the GPU backends run with no host synchronisation (an interior-point
method with a proven iteration bound, docs/solver.md), against the host reference
(Wolfe's active set), in both of its implementations: Triton (in the interpreter) and
csrc/mmgrad_math.h (the CUDA kernel's code, through the CPU build). Every draw is held
to docs/spec.md §4's duality-gap certificate, the one the host meets, for every M <= 16.
"""

from __future__ import annotations

import importlib.util
import math
import pytest
import torch

import mmgrad
from mmgrad import ops
from mmgrad import reference as R
from mmgrad.backends import cpu_extension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmgrad.reference.moo import MGDA_GAP_TOL, MOO_METHODS, min_norm_solve
from mmgrad.tools.verify import ILL_CONDITIONED_KINDS, duality_gap, ill_conditioned_gram

NORMALIZE = {"none": 0, "l2": 1, "loss": 2}


def solve(impl, grams, method, normalize="none", losses=None, magnitude=1.5):
    if impl == "triton":
        return ops.moo_weights(grams, method, normalize=normalize, losses=losses, magnitude=magnitude, backend="triton")
    loss = torch.ones(grams.shape[1], dtype=torch.float64) if losses is None else losses.to(torch.float64)
    return cpu_extension().moo_weights_device(grams.contiguous(), MOO_METHODS.index(method),
                                                               NORMALIZE[normalize], loss.contiguous(), float(magnitude))


IMPLS = [
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")),
    pytest.param("header", marks=pytest.mark.skipif(not mmgrad.backends()["cpu"].available, reason="the C++ extension is not built")),
]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def random_grams(gen, groups, m, n):
    """Gram matrices of gradients with spread-out norms (the imbalance mmgrad is for)."""
    g = torch.randn(groups, m, n, generator=gen, dtype=torch.float64)
    g = g * torch.exp(torch.randn(groups, m, 1, generator=gen, dtype=torch.float64))
    return g @ g.transpose(1, 2)


def combined_distance(k, a, b):
    d = a - b
    return float((d @ k @ d).clamp_min(0).sqrt())


@pytest.mark.parametrize("m", (3, 5, 16))
def test_device_mgda_meets_the_certificate_and_the_reference_direction(gen, impl, m):
    n = int(torch.randint(1, 2 * m, (), generator=gen))  # rank-deficient (n < m) too
    groups = 2 if m == 16 else 6  # the interpreter runs a program per group, ~1 s at M = 16
    k = random_grams(gen, groups, m, n)
    k[1, 0, :] = k[1, :, 0] = 0.0  # objective 0 does not reach group 1
    w = solve(impl, k, "mgda")
    ref = R.moo_weights(k, "mgda")
    assert w[1, 0] == 0.0
    for kk, a, b in zip(k, w, ref):
        assert torch.all(a >= 0) and math.isclose(float(a.sum()), 1.0, rel_tol=1e-12)
        top = float(kk.diagonal().max())
        ka = (kk @ a)[kk.diagonal() > 0]  # over the objectives that reach the group
        assert float(a @ kk @ a - ka.min()) <= MGDA_GAP_TOL * top  # docs/spec.md §4's certificate
        # the host meets it too, so the combined directions are within sqrt(gap * max K_mm) each
        assert combined_distance(kk, a, b) <= 2 * math.sqrt(MGDA_GAP_TOL * top)


DRAWS = dict(seed=st.integers(0, 2**32 - 1), m=st.integers(3, 16), kind=st.sampled_from(ILL_CONDITIONED_KINDS))


@pytest.mark.skipif(not mmgrad.backends()["cpu"].available, reason="the C++ extension is not built")
@given(**DRAWS)
@settings(max_examples=400, deadline=None)
def test_header_solver_meets_the_hosts_certificate_on_ill_conditioned_grams(seed, m, kind):
    check_certificate("header", seed, m, kind)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@given(**DRAWS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # ~2 s a draw, interpreted
def test_triton_solver_meets_the_hosts_certificate_on_ill_conditioned_grams(seed, m, kind):
    check_certificate("triton", seed, m, kind)


def check_certificate(impl, seed, m, kind):
    k = ill_conditioned_gram(seed, m, kind)
    top = float(k.diagonal().max())
    host = torch.from_numpy(min_norm_solve(k.numpy()))
    assert duality_gap(k, host) <= MGDA_GAP_TOL * top  # the host accepts the draw
    w = solve(impl, k[None], "mgda")[0]
    assert torch.all(w >= 0) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    assert duality_gap(k, w) <= MGDA_GAP_TOL * top, f"device gap {duality_gap(k, w) / top:.3g} of max K_mm"
    # MMPareto in conflict solves the same problem on the raw Gram: its direction meets it too
    cos = k / torch.outer(k.diagonal().sqrt(), k.diagonal().sqrt())
    if bool((cos <= 0).any()):
        w = solve(impl, k[None], "mmpareto")[0]
        assert duality_gap(k, w / w.sum()) <= MGDA_GAP_TOL * top


@pytest.mark.skipif(not mmgrad.backends()["cpu"].available, reason="the C++ extension is not built")
def test_the_iteration_budget_covers_the_proven_bound_and_triton_mirrors_the_header():
    """docs/solver.md: mu shrinks by (1 - t + t^2/4)(1 + 1/(8n)) per iteration with
    t = sqrt(2^1.5 / (8n)) less the bisection's resolution, from n mu_0 <= 8 sqrt(n) + 2
    down to the stopping target; the budget must cover the worst n <= 16."""
    from mmgrad.kernels import triton_kernels as T

    ext = cpu_extension()
    bound = 0
    for n in range(3, ext.MOO_MAX_OBJECTIVES + 1):  # n = 1, 2: no iteration (trivial, closed form)
        t = math.sqrt(2**1.5 / (8 * n)) - 2.0**-ext.MOO_BISECTIONS
        rate = (1 - t + t * t / 4) * (1 + 1 / (8 * n))
        bound = max(bound, math.ceil(math.log((8 * math.sqrt(n) + 2) / ext.MOO_GAP_TARGET) / -math.log(rate)))
    assert bound == 149 and ext.MOO_ITERATIONS >= bound
    assert (T.MOO_ITERATIONS, T.MOO_BISECTIONS, T.MOO_GAP_TARGET) == (ext.MOO_ITERATIONS, ext.MOO_BISECTIONS, ext.MOO_GAP_TARGET)


def test_device_mgda_closed_cases(gen, impl):
    k2 = random_grams(gen, 4, 2, 5)
    assert torch.allclose(solve(impl, k2, "mgda"), R.moo_weights(k2, "mgda"), rtol=0, atol=1e-12)
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    assert torch.equal(solve(impl, zero, "mgda"), torch.full((1, 3), 1 / 3, dtype=torch.float64))
    k = random_grams(gen, 2, 4, 9)
    losses = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    for normalize in ("l2", "loss"):
        w = solve(impl, k, "mgda", normalize=normalize, losses=losses)
        ref = R.moo_weights(k, "mgda", normalize=normalize, losses=losses)
        s = k.diagonal(dim1=1, dim2=2).sqrt() if normalize == "l2" else losses.expand(2, 4)
        for kk, a, b, sc in zip(k, w, ref, s):
            kn = kk / torch.outer(sc, sc)
            assert combined_distance(kn, a, b) <= 2 * math.sqrt(MGDA_GAP_TOL * float(kn.diagonal().max()))


def test_device_mmpareto(gen, impl):
    # every pair agrees: uniform direction, exact
    g = torch.rand(3, 4, 12, generator=gen, dtype=torch.float64) + 0.1
    k = g @ g.transpose(1, 2)
    assert torch.allclose(solve(impl, k, "mmpareto"), R.moo_weights(k, "mmpareto"), rtol=1e-12, atol=0)
    # M = 2 in conflict: the closed form
    k2 = torch.tensor([[[4.0, -1.0], [-1.0, 1.0]], [[1.0, -0.5], [-0.5, 9.0]]], dtype=torch.float64)
    assert torch.allclose(solve(impl, k2, "mmpareto", magnitude=2.0), R.moo_weights(k2, "mmpareto", magnitude=2.0), rtol=1e-9, atol=0)
    # conflicts among M = 5, min-norm point well away from 0: the combined gradient agrees
    g = torch.randn(4, 5, 40, generator=gen, dtype=torch.float64)
    g[:, 0] -= 2 * g[:, 1]
    k = g @ g.transpose(1, 2)
    w, ref = solve(impl, k, "mmpareto"), R.moo_weights(k, "mmpareto")
    for kk, a, b in zip(k, w, ref):
        assert combined_distance(kk, a, b) <= 1e-3 * float((b @ kk @ b).sqrt())


@pytest.mark.parametrize("method, normalize", [(2, 0), (7, 0), (-1, 0), (0, 3)])
def test_an_unknown_method_or_normalize_code_is_refused_on_every_device_solver(impl, method, normalize):
    """Never another method's weights: the codes are checked before a launch."""
    grams = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    ones = torch.ones(3, dtype=torch.float64)
    if impl == "triton":
        import mmgrad.kernels.triton_kernels  # noqa: F401  (registers the operator)

        call = lambda: torch.ops.mmgrad.triton_moo_weights(grams, method, normalize, ones, 1.5)  # noqa: E731
    else:
        call = lambda: cpu_extension().moo_weights_device(grams, method, normalize, ones, 1.5)  # noqa: E731
    with pytest.raises((ValueError, RuntimeError), match="code"):
        call()


@pytest.mark.skipif(cpu_extension() is None, reason="the C++ extension is not built")
def test_the_header_method_codes_are_the_reference_order():
    assert tuple(cpu_extension().MOO_METHOD_CODES) == tuple(range(len(MOO_METHODS)))
    assert MOO_METHODS == ("mgda", "mmpareto")
