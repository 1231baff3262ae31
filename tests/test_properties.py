"""Properties of the reference that must hold on inputs nobody chose (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mmgrad import reference as R

F64 = torch.float64


@st.composite
def opinion_sets(draw, max_m=8, n=5):
    m = draw(st.integers(1, max_m))
    e = draw(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=m * n, max_size=m * n))
    signs = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=m * n, max_size=m * n))
    mu = torch.tensor(signs, dtype=F64).view(m, n)
    evidence = torch.tensor(e, dtype=F64).view(m, n)
    # opinions with given evidence: lam*mu^2 = evidence (var chosen accordingly, eps = 1)
    var = torch.where(mu != 0, 1.0 / evidence.clamp_min(1e-300) - 1.0, torch.zeros_like(mu)).clamp_min(0.0)
    return mu, var


@given(opinion_sets(), st.randoms())
@settings(max_examples=150, deadline=None)
def test_ds_combination_does_not_depend_on_objective_order(mv, rnd):
    mu, var = mv
    _, bp, bn, u = R.opinions(mu, var, 1.0, 1.0)
    perm = list(range(mu.shape[0]))
    rnd.shuffle(perm)
    a = R.ds_combine(bp, bn, u)
    b = R.ds_combine(bp[perm], bn[perm], u[perm])
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    total = a[0] + a[1] + a[2]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)  # still a opinion


@given(st.integers(2, 8), st.floats(1e3, 1e12), st.sampled_from([1.0, -1.0]))
@settings(max_examples=60, deadline=None)
def test_agreeing_confident_objectives_give_confidence_near_one(m, evidence, sign):
    mu = torch.full((m, 1), sign, dtype=F64)
    var = torch.full((m, 1), 1.0 / evidence - 1e-12, dtype=F64).clamp_min(0)
    out, d = R.bogc_from_moments(mu, var, eps=1e-12)
    conf = (d["belief_pos"] - d["belief_neg"]).abs()
    assert conf.item() > 1 - 1e-3
    assert out.item() == pytest.approx(sign * m * conf.item(), rel=1e-9)


@given(st.integers(1, 4), st.floats(1e-3, 1e12), st.floats(1e-6, 1e6), st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=80, deadline=None)
def test_exactly_opposite_objectives_give_zero_confidence(pairs, evidence, magnitude, dtype):
    mu = torch.tensor([magnitude, -magnitude] * pairs, dtype=dtype).view(2 * pairs, 1)
    var = torch.full_like(mu, magnitude**2 / evidence)
    out, d = R.bogc_from_moments(mu, var)
    assert torch.isfinite(out).all()
    assert (d["belief_pos"] - d["belief_neg"]).abs().item() <= 1e-6
    assert out.abs().item() <= 1e-6 * magnitude * 2 * pairs


def _psd(draw, m):
    n = draw(st.integers(1, 12))
    vals = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=m * n, max_size=m * n))
    g = torch.tensor(vals, dtype=F64).view(m, n)
    return g @ g.T


@st.composite
def grams(draw):
    return _psd(draw, draw(st.integers(2, 8)))


def _qp_minimum(k: np.ndarray) -> float:
    m = k.shape[0]
    best = np.inf
    for start in [np.full(m, 1.0 / m), *np.eye(m)]:
        res = minimize(lambda a: a @ k @ a, start, jac=lambda a: 2 * k @ a, method="SLSQP",
                       bounds=[(0, 1)] * m, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
                       options={"ftol": 1e-15, "maxiter": 500})
        best = min(best, float(res.x @ k @ res.x))
    return best


@given(grams())
@settings(max_examples=120, deadline=None)
def test_mgda_weights_lie_on_the_simplex_and_match_a_qp_solver(k):
    alpha = R.mgda_weights(k)
    assert (alpha >= 0).all() and abs(alpha.sum().item() - 1.0) < 1e-12
    kn = k.numpy()
    active = np.diag(kn) > 0
    if not active.any():
        return
    ours = float(alpha @ k @ alpha)
    qp = _qp_minimum(kn[np.ix_(active, active)])
    scale = np.diag(kn).max()
    assert ours <= qp + 1e-6 * scale  # never worse than scipy, up to the gap tolerance
    # the duality-gap certificate of docs/spec.md §4
    ka = (k @ alpha)[torch.from_numpy(active)]
    assert ours - ka.min().item() <= 1e-6 * scale
