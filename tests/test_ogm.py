"""OGM-GE (docs/spec.md §4): the reference against hand-worked cases, the calibrator on every
backend against the dense computation, the GE noise reproducible and resumed exactly.
The model here is linear: ``modulate="all"`` makes every tensor modulated (and noised);
the official defaults are held against a port of the official step in
``tests/test_faithful.py``."""

from __future__ import annotations

import math

import pytest
import torch

import mmgrad
from mmgrad import reference as R
from mmgrad.training.models import LateFusion
from mmgrad.tools.verify import rel_err

from test_layout import BACKENDS, dense_grads, written

DIMS = {"a": 5, "b": 4, "c": 3}


def test_two_views_by_hand():
    k, rho = R.ogm_coefficients(torch.tensor([0.2, 0.9], dtype=torch.float64), alpha=0.5)
    s_a, s_b = math.exp(-0.2), math.exp(-0.9)
    assert rho.tolist() == pytest.approx([s_a / s_b, s_b / s_a], rel=1e-12)
    # view a dominates (rho > 1): its fused gradient is scaled down; view b keeps it
    assert k.tolist() == pytest.approx([1 - math.tanh(0.5 * s_a / s_b), 1.0], rel=1e-12)


def test_three_views_by_hand():
    f = [0.1, 0.5, 1.0]
    s = [math.exp(-x) for x in f]
    k, rho = R.ogm_coefficients(torch.tensor(f, dtype=torch.float64), alpha=0.3)
    want_rho = [(s[0] / s[1] + s[0] / s[2]) / 2, (s[1] / s[0] + s[1] / s[2]) / 2, (s[2] / s[0] + s[2] / s[1]) / 2]
    assert rho.tolist() == pytest.approx(want_rho, rel=1e-12)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.3 * r) if r > 1 else 1.0 for r in want_rho], rel=1e-12)


def test_equal_views_one_view_and_huge_losses():
    k, rho = R.ogm_coefficients(torch.tensor([0.7, 0.7]))
    assert rho.tolist() == [1.0, 1.0] and k.tolist() == [1.0, 1.0]  # rho = 1 is not > 1
    assert R.ogm_coefficients(torch.tensor([3.0]))[0].tolist() == [1.0]
    k, rho = R.ogm_coefficients(torch.tensor([1000.0, 1001.0]))  # exp(-f) underflows; the ratio does not
    assert rho.tolist() == pytest.approx([math.e, 1 / math.e]) and 0 < float(k[0]) < 1


def _model(seed=0):
    torch.manual_seed(seed)
    return LateFusion(DIMS, num_classes=3, hidden=6, embed=4)


def _losses(model, gen):
    x = {v: torch.randn(12, d, generator=gen) for v, d in DIMS.items()}
    return model.losses(x, torch.randint(0, 3, (12,), generator=gen))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unimodal", [0.0, 0.5])
def test_calibrator_is_the_modulated_combination(gen, backend, unimodal):
    model = _model()
    cal = mmgrad.FusedCalibrator(model.param_groups(), 4, method="ogm", backend=backend, noise=False,
                                 unimodal=unimodal, alpha=0.7, modulate="all")  # the model has no convolution
    off = cal.group_offsets.tolist()
    for step in range(3):
        ls = _losses(model, gen)
        g = dense_grads(ls, cal.params)
        lv = torch.stack([x.detach() for x in ls]).double()
        k, _ = R.ogm_coefficients(lv[1:], 0.7)
        want = torch.cat([k[v] * g[0, a:b] + unimodal * g[v + 1, a:b] for v, (a, b) in enumerate(zip(off[:-1], off[1:]))])
        cal.backward(ls)
        assert cal.step()
        assert rel_err(written(cal), want) <= 2e-5, f"step {step}"
        assert torch.allclose(cal.diagnostics["ogm_coefficients"], k)
        for p in cal.params:
            p.data -= 0.1 * p.grad
            p.grad = None


def _run(cal, model, gen, steps):
    out = []
    for _ in range(steps):
        cal.backward(_losses(model, gen))
        out.append(written(cal))
        model.zero_grad()
    return out


def test_ge_noise_has_the_groups_spread_and_is_reproducible(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    runs = {}
    for name, opts in (("quiet", {"noise": False}), ("a", {"seed": 3}), ("b", {"seed": 3}), ("c", {"seed": 4})):
        model = _model()
        cal = mmgrad.FusedCalibrator(model.param_groups(), 4, method="ogm", modulate="all", noise_std="group", **opts)
        runs[name] = (_run(cal, model, torch.Generator().manual_seed(seed), 1)[0], cal.diagnostics)
        del cal
    quiet, noisy = runs["quiet"][0], runs["a"][0]
    assert torch.equal(noisy, runs["b"][0]) and not torch.equal(noisy, runs["c"][0])
    off = mmgrad.FusedCalibrator(_model().param_groups(), 4, method="ogm").group_offsets.tolist()
    for g, (a, b) in enumerate(zip(off[:-1], off[1:])):
        sigma = float(runs["a"][1]["noise_std"][g])
        assert sigma == pytest.approx(float(quiet[a:b].std()), rel=1e-6)  # the modulated gradient's spread
        added = (noisy - quiet)[a:b]
        assert float(added.std()) == pytest.approx(sigma, rel=0.25)  # N(0, sigma^2) over hundreds of coordinates


def test_checkpoint_resumes_the_noise_exactly(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model = _model()
    cal = mmgrad.FusedCalibrator(model.param_groups(), 4, method="ogm", seed=11, modulate="all")
    data = torch.Generator().manual_seed(seed)
    _run(cal, model, data, 3)
    state, data_state = cal.state_dict(), data.get_state()
    tail = _run(cal, model, data, 2)
    del cal
    resumed = mmgrad.FusedCalibrator(model.param_groups(), 4, method="ogm", seed=11, modulate="all")
    resumed.load_state_dict(state)
    data.set_state(data_state)
    assert all(torch.equal(a, b) for a, b in zip(_run(resumed, model, data, 2), tail))


def test_the_noise_is_a_function_of_seed_step_parameter_and_element():
    from mmgrad.methods._ogm import ge_noise

    a = ge_noise(5, 7, 2, 0, 200_000, "cpu")
    assert torch.equal(a, ge_noise(5, 7, 2, 0, 200_000, "cpu"))
    assert torch.equal(a[1000:1300], ge_noise(5, 7, 2, 1000, 300, "cpu"))  # a rank's slice: the same draws
    assert torch.equal(ge_noise(5, torch.tensor(7), 2, 0, 50, "cpu"), a[:50])  # a device step count: the same
    for other in (ge_noise(6, 7, 2, 0, 200_000, "cpu"), ge_noise(5, 8, 2, 0, 200_000, "cpu"),
                  ge_noise(5, 7, 3, 0, 200_000, "cpu")):
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.01  # independent streams
    # standard normal: mean, spread and tails of 200,000 draws
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01
    assert abs(float((a.abs() > 1.96).float().mean()) - 0.05) < 0.003


def test_a_skipped_step_leaves_the_next_steps_noise_as_it_was(gen):
    """The noise of committed step t is fixed by t: a step skipped for a non-finite
    gradient in between draws nothing that the next committed step then lacks."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    outs = []
    for poison in (False, True):
        model = _model()
        cal = mmgrad.FusedCalibrator(model.param_groups(), 4, method="ogm", seed=11, skip_nonfinite=True, modulate="all")
        data = torch.Generator().manual_seed(seed)
        if poison:
            losses = _losses(model, data)
            cal.backward([losses[0] * float("nan"), *losses[1:]])
            assert cal.step() is False
            data = torch.Generator().manual_seed(seed)
        outs.append(_run(cal, model, data, 2))
        del cal
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_ogm_misuse_is_named():
    model = _model()
    groups = model.param_groups()
    with pytest.raises(ValueError, match="group_objectives: give each of the 2 parameter groups"):
        mmgrad.FusedCalibrator(groups[:2], 4, method="ogm")
    with pytest.raises(ValueError, match="group_objectives must list one objective per parameter group"):
        mmgrad.FusedCalibrator(groups, 4, method="ogm", group_objectives=[1, 2])
    with pytest.raises(ValueError, match=r"group_objectives must name view objectives in \[1, 3\]"):
        mmgrad.FusedCalibrator(groups, 4, method="ogm", group_objectives=[1, 2, 0])
    with pytest.raises(ValueError, match="alpha"):
        mmgrad.FusedCalibrator(groups, 4, method="ogm", alpha=0.0)
    with pytest.raises(ValueError, match="unimodal must be a number >= 0"):
        mmgrad.FusedCalibrator(groups, 4, method="ogm", unimodal=-1.0)
    with pytest.raises(TypeError, match="noise must be a bool"):
        mmgrad.FusedCalibrator(groups, 4, method="ogm", noise=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        mmgrad.FusedCalibrator(groups, 4, method="ogm", seed="7")
    two = mmgrad.FusedCalibrator(groups[:2], 4, method="ogm", group_objectives=[1, 3], noise=False)
    assert two.step_count == 0
