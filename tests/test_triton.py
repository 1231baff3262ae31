"""Triton kernels against the float64 reference, on CPU tensors in Triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 for the whole suite, before anything imports Triton.
Tolerances as for the CPU kernels.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

import mmgrad
from mmgrad import ops
from mmgrad import reference as R
from mmgrad.tools.verify import TOLERANCE, combine_floor, ema_floor, norm_sq_floor, random_case, rel_err


def f64(t):
    return t.to(torch.float64)


def test_backend_is_available_under_the_interpreter():
    info = mmgrad.backends()["triton"]
    assert info.available and "cpu" in info.devices
    assert ops.backend_module("triton", torch.device("cpu")).__name__.endswith("triton_kernels")


@pytest.mark.parametrize("m", (1, 2, 3, 8))
@pytest.mark.parametrize("n", (1, 7, 1025, 70_001))
def test_bogc_step_matches_the_reference(gen, m, n):
    c = random_case(m, n, torch.float32, gen)
    out = torch.full((n,), float("nan"))
    m_out, v_out = torch.full_like(c.mean, float("nan")), torch.full_like(c.var, float("nan"))
    res, m1, v1, st = ops.bogc_step(c.g, c.mean, c.var, c.step, group_offsets=c.group_offsets, out=out, mean_out=m_out, var_out=v_out, backend="triton")
    ref, rm1, rv1, rst = R.bogc_step(f64(c.g), f64(c.mean), f64(c.var), c.step, group_offsets=c.group_offsets)
    assert rel_err(res, ref) <= 1e-5 and rel_err(m1, rm1, ema_floor(c.g, c.mean)) <= 1e-6 and rel_err(v1, rv1) <= 1e-6
    assert rel_err(st["gram"], rst["gram"]) <= 1e-12
    assert rel_err(st["sum_sq"], rst["sum_sq"]) <= 1e-5
    # where the fused beliefs nearly tie, |b+ - b-| cancels: the backward-stable bound
    assert rel_err(st["out_sq"], rst["out_sq"], norm_sq_floor(rst["out_sq"], c.g)) <= 1e-5
    for key in ("uncertainty", "conflict", "weights"):  # means of values in [0, 1]: absolute error
        assert (f64(st[key]) - f64(rst[key])).abs().max() <= 1e-6, key
    assert int(st["nonfinite"]) == 0


@pytest.mark.parametrize("confidence", ("belief", "certainty", "none"))
@pytest.mark.parametrize("weights", ("belief", "precision"))
def test_bogc_options(gen, confidence, weights):
    c = random_case(3, 1025, torch.float32, gen)
    kw = dict(beta=0.8, gamma=0.5, eps=1e-6, confidence=confidence, weights=weights, rescale=False)
    res, *_ = ops.bogc_step(c.g, c.mean, c.var, c.step, backend="triton", **kw)
    ref, *_ = R.bogc_step(f64(c.g), f64(c.mean), f64(c.var), c.step, **kw)
    assert rel_err(res, ref) <= 1e-5


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_half_gradients(gen, dtype):
    c = random_case(2, 1025, dtype, gen)
    res, *_ = ops.bogc_step(c.g, c.mean, c.var, c.step, backend="triton")
    ref, *_ = R.bogc_step(f64(c.g), f64(c.mean), f64(c.var), c.step)
    assert res.dtype == dtype and rel_err(res, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("m", (1, 2, 3, 4))  # SAMPLE_MAX_OBJECTIVES; M = 5 is a ValueError (test_errors)
def test_sample_step(gen, m):
    c = random_case(m, 1025, torch.float32, gen, samples=4)
    out = torch.full((1025,), float("nan"))
    res, st = ops.bogc_sample_step(c.samples, group_offsets=c.group_offsets, out=out, backend="triton")
    ref, rst = R.bogc_sample_step(f64(c.samples), group_offsets=c.group_offsets)
    assert rel_err(res, ref) <= 1e-5 and rel_err(st["gram"], rst["gram"]) <= 1e-6


@pytest.mark.parametrize("m", (1, 2, 3, 8))
@pytest.mark.parametrize("n", (1, 7, 1025, 70_001))
def test_gram_and_combine(gen, m, n):
    c = random_case(m, n, torch.float32, gen)
    groups = c.group_offsets.numel() - 1
    alpha = torch.rand(groups, m, dtype=torch.float64, generator=gen)
    out = torch.full((n,), float("nan"))
    res, st = ops.combine_and_gram(c.g, alpha, group_offsets=c.group_offsets, out=out, backend="triton")
    floor = combine_floor(c.g, alpha, c.group_offsets)  # backward-stable: N = 1 can cancel
    assert rel_err(res, R.combine(f64(c.g), alpha, group_offsets=c.group_offsets), floor) <= 1e-6
    assert rel_err(st["gram"], R.gram(f64(c.g), group_offsets=c.group_offsets)) <= 1e-12
    assert rel_err(ops.gram(c.g, backend="triton"), R.gram(f64(c.g))) <= 1e-12


def test_nonfinite_is_counted(gen):
    c = random_case(3, 1025, torch.float32, gen)
    g = c.g.clone()
    g[1, 5], g[2, 700] = float("nan"), float("inf")
    *_, st = ops.bogc_step(g, c.mean, c.var, 1, backend="triton")
    assert int(st["nonfinite"]) == 2


def test_calibrator_on_triton_trains_like_the_reference():
    runs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        enc_a, enc_b, head = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.nn.Linear(8, 3)
        params = [*enc_a.parameters(), *enc_b.parameters(), *head.parameters()]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        cal = mmgrad.FusedCalibrator([{"params": enc_a.parameters()}, {"params": enc_b.parameters()}], 3, backend=backend).attach(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            xa, xb, y = torch.randn(16, 6, generator=gen), torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            za, zb = enc_a(xa), enc_b(xb)
            ce = torch.nn.functional.cross_entropy
            cal.backward([ce(head(torch.cat([za, zb], 1)), y), ce(za[:, :3], y), ce(zb[:, :3], y)])
            opt.step()
            opt.zero_grad()
        runs.append(torch.cat([p.detach().reshape(-1) for p in params]))
    assert rel_err(runs[1], runs[0]) <= 1e-5


def test_errors():
    with pytest.raises(ValueError, match="M=9 objectives; backend='triton' takes at most 8 per segment"):
        ops.gram(torch.randn(9, 8), backend="triton")
    with pytest.raises(ValueError, match="M=9 objectives; backend='triton' takes at most 8"):
        ops.bogc_step(torch.randn(9, 4), torch.zeros(9, 4), torch.zeros(9, 4), 1, backend="triton")
    with pytest.raises(ValueError, match="M=5 objectives; backend='triton' takes at most 4 per segment with the sample estimator"):
        ops.bogc_sample_step(torch.randn(2, 5, 4), backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        ops.gram(torch.randn(3, 8).T, backend="triton")
    with pytest.raises(TypeError, match="float32"):
        ops.bogc_step(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64), 1, backend="triton")
    with pytest.raises(ValueError, match="S >= 2"):
        ops.bogc_sample_step(torch.randn(1, 2, 4), backend="triton")
