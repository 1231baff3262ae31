"""Fuzzed equivalence: every available backend against the float64 reference on drawn
M, N, dtypes, options and values (zeros, subnormals, huge magnitudes, exact ties,
sigma^2 = 0, objectives that do not reach a coordinate).

500 examples by default (about a minute); a longer run by hand:
``MMGRAD_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``.

Errors are normwise relative, with an absolute floor where float32/half cannot follow
the float64 oracle: when every gradient of a step is below ~1e-19, the belief-scaled
output (|b+ - b-| * mu) underflows in float32 and norm matching has nothing to rescale,
so the step comes out as zeros where float64 keeps a gradient of that size (README,
docs/spec.md §9). The floor (1e-13 for float32 arithmetic) covers exactly that.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmgrad
from mmgrad import ops
from mmgrad import reference as R
from mmgrad.tools.verify import TOLERANCE, rel_err, stable_floor

EXAMPLES = int(os.environ.get("MMGRAD_FUZZ_EXAMPLES", "500"))
# The interpreter runs a Triton example in ~0.1 s: fewer examples, same strategy.
TRITON_EXAMPLES = int(os.environ.get("MMGRAD_FUZZ_TRITON_EXAMPLES", "200"))
AVAILABLE = [n for n, i in mmgrad.backends().items() if i.available and n != "reference" and "cpu" in i.devices]
BACKENDS = [b for b in AVAILABLE if b != "triton"]
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the triton/cuda kernels take no float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# magnitudes each dtype represents (finite), from subnormal to near its largest value
POOLS = {
    torch.float32: (0.0, 1e-40, 1e-20, 1e-3, 1.0, 3.0, 1e6, 1e15, 1e30),
    torch.bfloat16: (0.0, 1e-40, 1e-20, 1e-3, 1.0, 3.0, 1e6, 1e15, 1e30),
    torch.float16: (0.0, 1e-7, 1e-3, 1.0, 3.0, 100.0, 1e3),  # sums of 9 stay below fp16 max
    torch.float64: (0.0, 1e-310, 1e-20, 1e-3, 1.0, 3.0, 1e6, 1e15, 1e30, 1e100),
}
FLOOR = {torch.float32: 1e-13, torch.bfloat16: 1e-13, torch.float16: 1e-3, torch.float64: 1e-150}


# Triton 3.9's interpreter converts bf16 subnormals to float32 wrongly (9.18e-41 -> 0,
# 1.01e-39 -> 4.41e-39; a GPU converts them exactly), so the triton fuzzing draws none.
TRITON_POOLS = {**POOLS, torch.bfloat16: tuple(v for v in POOLS[torch.bfloat16] if v == 0.0 or v > 1e-37)}


def draw_values(rng: np.random.Generator, shape, dtype, pools=POOLS) -> torch.Tensor:
    pool = np.array(pools[dtype])
    mag = pool[rng.integers(0, pool.size, size=shape)] * rng.uniform(0.5, 2.0, size=shape)
    if rng.random() < 0.3:  # exact ties: repeat one value everywhere in a row
        mag[:] = mag.flat[0]
    x = mag * rng.choice([-1.0, 1.0], size=shape)
    return torch.from_numpy(x).to(dtype)


@st.composite
def cases(draw, dtypes=DTYPES, max_m=9):
    return dict(
        m=draw(st.integers(1, max_m)),
        n=draw(st.integers(1, 300)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**32 - 1)),
        confidence=draw(st.sampled_from(("belief", "certainty", "none"))),
        weights=draw(st.sampled_from(("belief", "precision"))),
        zero_var=draw(st.booleans()),
        step=draw(st.integers(1, 30)),
        beta=draw(st.sampled_from((0.0, 0.5, 0.9, 0.999))),
    )


def _f64(t):
    return t.to(torch.float64)


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend runs on CPU tensors here")
@given(cases())
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_backend_matches_the_reference(case):
    for b in BACKENDS:
        check_backend(b, case, POOLS)


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton is not installed")
# the triton kernels take M <= 8 per segment (triton_kernels.MAX_OBJECTIVES; M = 9 is a
# ValueError, tests/test_triton.py)
@given(cases(GPU_DTYPES, max_m=8))
@settings(max_examples=TRITON_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_triton_matches_the_reference(case):
    check_backend("triton", case, TRITON_POOLS)


def check_backend(b, case, pools):
    rng = np.random.default_rng(case["seed"])
    m, n, dt = case["m"], case["n"], case["dtype"]
    g = draw_values(rng, (m, n), dt, pools)
    g[torch.from_numpy(rng.random((m, n)) < 0.2)] = 0  # unreached coordinates
    state_dt = torch.float64 if dt == torch.float64 else torch.float32
    mu = g.to(state_dt)
    var = torch.zeros_like(mu) if case["zero_var"] else draw_values(rng, (m, n), dt, pools).to(state_dt).abs()
    var[mu == 0] = 0
    # EMA state: a mean half the gradient (so the deviation is too), the drawn variance
    mean_state = torch.where(mu == 0, torch.zeros_like(mu), mu * 0.5)
    var_state = var.clone()
    ema = dict(beta=case["beta"])
    ref_mean, ref_var = R.ema_moments(_f64(g), _f64(mean_state), _f64(var_state), case["step"], **ema)
    # A variance beyond the state dtype's range (|g - mean| above ~1e19 in float32) cannot be
    # stored, in the raw moments m, v either: it saturates to inf (test_kernels_cpu pins that), so the
    # steps are compared where the next variance fits; those columns are left unreached.
    over = (ref_var > torch.finfo(state_dt).max).any(0)
    for t in (g, mu, var, mean_state, var_state):
        t[:, over] = 0
    tol = TOLERANCE[dt]
    # The direction is a weighted sum of the mu: where it cancels, the natural error bound is
    # eps * M * max|mu|, not eps * |result| (backward stability), so that is the floor.
    floor = max(FLOOR[dt], stable_floor(mu))
    kw = dict(confidence=case["confidence"], weights=case["weights"])
    ref_out, ref_d = R.bogc_from_moments(_f64(mu), _f64(var), **kw)
    # Norm matching is compared apart: it amplifies whatever the cancellation left (in float64
    # too), so the step is checked before it and the norms it uses are checked on their own.
    ref_step, ref_mean, ref_var, ref_st = R.bogc_step(_f64(g), _f64(mean_state), _f64(var_state), case["step"],
                                                      rescale=False, **ema, **kw)
    if ops.implements(ops.backend_module(b, mu.device), "bogc_from_moments"):
        out, d = ops.bogc_from_moments(mu, var, backend=b, **kw)
        assert rel_err(out, ref_out, floor) <= tol, (b, "bogc_from_moments")
        assert rel_err(d["uncertainty"], ref_d["uncertainty"], 1.0) <= max(tol, 1e-6), (b, "uncertainty")
    step_out, new_mean, new_var, st_ = ops.bogc_step(g, mean_state, var_state, case["step"], rescale=False, backend=b,
                                                     **ema, **kw)
    assert torch.isfinite(step_out).all(), (b, "bogc_step non-finite")
    assert rel_err(step_out, ref_step, floor) <= tol, (b, "bogc_step")
    # the state in float32 arithmetic (decision 3 (docs/spec.md)): the mean, a sum that may cancel, to its
    # terms' size; the variance, a sum of non-negative terms, to its own; both at least the
    # dtype's smallest normal: arithmetic on subnormals is exact only to the last subnormal
    # bit (m = 1, subnormal g around 4e-41, seed 249393225: one bit is 1.3e-5 of them), and
    # d^2 of subnormal gradients flushes (next to eps it cannot matter)
    tiny = torch.finfo(state_dt).tiny
    state_floor = max(tiny, float(_f64(mean_state).abs().max() + (_f64(g) - _f64(mean_state)).abs().max()))
    assert rel_err(new_mean, ref_mean, state_floor) <= tol, (b, "EMA mean")
    assert rel_err(new_var, ref_var, tiny) <= tol, (b, "EMA variance")
    assert rel_err(st_["sum_sq"], ref_st["sum_sq"]) <= 1e-6, (b, "sum_sq")
    assert rel_err(ops.gram(g, backend=b), R.gram(_f64(g))) <= 1e-12, (b, "gram")


@pytest.mark.parametrize("backend", ["reference", *AVAILABLE])
def test_a_variance_beyond_the_state_dtype_saturates_and_the_objective_goes_vacuous(backend):
    """|g - mean| = 2e30: the variance (~1e60) does not fit float32 state (the raw moment v = g^2
    would not either). It is stored as inf, so the precision there is 0 and the objective
    gives no opinion on that coordinate: the step equals the other objective's alone, and
    every output and every other state entry stays finite (docs/spec.md, decision 3)."""
    g = torch.tensor([[1e30, 2.0, -3.0], [1.0, 1.0, 1.0]])
    mean, var = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    mean[0, 0] = -1e30
    out, new_mean, new_var, _ = ops.bogc_step(g, mean, var, 2, beta=0.5, rescale=False, backend=backend)
    assert new_var[0, 0] == float("inf") and torch.isfinite(new_var.flatten()[1:]).all()
    assert torch.isfinite(new_mean).all() and torch.isfinite(out).all()
    alone, *_ = R.bogc_step(g[1:], mean[1:], var[1:], 2, beta=0.5, rescale=False)
    assert rel_err(out[:1], alone[:1]) <= 1e-6
