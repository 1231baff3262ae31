"""The habits of a PyTorch training loop hold with a calibrator in it: ``.grad`` holds the
calibrated gradient when ``backward`` returns (so clipping, logging and unscaling work
where they always stand), gradients accumulate without ``zero_grad`` as PyTorch's do,
``requires_grad`` changes are reported, and errors name parameters."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import mmgrad
from mmgrad.tools.verify import rel_err

from conftest import builtin_methods
from toy_model import TwoView, batch

EVERY_METHOD = builtin_methods()
LR, CLIP = 0.5, 0.05


def _twins(method, opt_class=torch.optim.SGD, **options):
    """Two identical models, each with its optimizer and attached calibrator (OGM's third
    group, reached by the fusion loss only, is no view's: it joins the first)."""
    torch.manual_seed(0)
    model = TwoView()
    twin = copy.deepcopy(model)
    made = []
    for net in (model, twin):
        opt = opt_class(net.parameters(), lr=LR)
        if method == "ogm":
            options = {**options, "group_objectives": [1, 2, 1]}
        made.append((net, opt, mmgrad.FusedCalibrator(net.groups(), 3, method=method, **options).attach(opt)))
    return made


def _grads(net):
    return [p.grad.detach().clone() if p.grad is not None else None for p in net.parameters()]


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_clipping_right_after_backward_clips_the_calibrated_gradient(gen, method):
    """backward -> clip_grad_norm_ -> step, the usual order: the clip sees every
    parameter's calibrated gradient, and the optimizer steps with the clipped one."""
    (model, opt, cal), (twin, _, twin_cal) = _twins(method)
    b = batch(gen)
    twin_cal.backward(twin.losses(*b))  # the unclipped calibrated gradient
    want = _grads(twin)
    assert all(g is not None for g in want), "backward() must leave .grad written for every parameter"
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in want))
    assert norm > 4 * CLIP, "the clip must bind for this test to see it"
    cal.backward(model.losses(*b))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    assert abs(float(total) - norm) <= 1e-5 * norm  # the clip measured the calibrated parameters too
    scale = CLIP / (norm + 1e-6)  # clip_grad_norm_'s factor
    for p, g in zip(model.parameters(), want):
        assert rel_err(p.grad, scale * g) <= 1e-6
    before = [p.detach().double() for p in model.parameters()]
    opt.step()  # steps with the clipped gradient: calibrating again here would undo the clip
    for p, p0, g in zip(model.parameters(), before, want):
        update = LR * scale * g.double()
        assert (p.detach().double() - (p0 - update)).abs().max() <= 1e-3 * update.abs().max() + 1e-7


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_without_zero_grad_every_parameter_accumulates_as_in_pytorch(gen, method):
    """Two steps without zero_grad in between: .grad is the first step's gradient plus the
    second's, for the calibrated parameters exactly as for the others."""
    (model, opt, cal), (twin, twin_opt, twin_cal) = _twins(method)
    first, second = batch(gen), batch(gen)
    cal.backward(model.losses(*first))
    kept = _grads(model)
    opt.step()  # no zero_grad
    cal.backward(model.losses(*second))
    twin_cal.backward(twin.losses(*first))
    twin_opt.step()
    twin_opt.zero_grad()
    twin_cal.backward(twin.losses(*second))
    for name_p, g, old, fresh in zip(model.named_parameters(), _grads(model), kept, _grads(twin)):
        assert rel_err(g, old + fresh) <= 1e-6, name_p[0]


def test_a_skipped_step_leaves_what_earlier_steps_accumulated(gen):
    torch.manual_seed(0)
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc", skip_nonfinite=True)
    cal.backward(model.losses(*batch(gen)))
    kept = [p.grad.clone() for p in cal.params]
    losses = model.losses(*batch(gen))
    losses[1] = losses[1] * float("nan")
    cal.backward(losses)
    assert bool(cal.diagnostics["skipped"])
    assert all(torch.equal(p.grad, k) for p, k in zip(cal.params, kept))


def test_a_second_backward_inside_accumulate_then_clip_matches_one_backward_of_the_sum(gen):
    """Accumulation with clipping in the usual place: k - 1 micro-batches in accumulate(),
    the last outside it; the clip then sees the calibration of the summed losses."""
    (model, opt, cal), (twin, twin_opt, twin_cal) = _twins("mgda")
    micro = [batch(gen, n=8) for _ in range(3)]
    with cal.accumulate():
        for b in micro[:-1]:
            cal.backward([loss / 3 for loss in model.losses(*b)])
    assert all(p.grad is None for p in cal.params)  # nothing calibrated before the last micro-batch
    cal.backward([loss / 3 for loss in model.losses(*micro[-1])])
    twin_cal.backward([sum(ls) / 3 for ls in zip(*[twin.losses(*b) for b in micro])])
    for net, o in ((model, opt), (twin, twin_opt)):
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-6


def test_step_after_backward_changes_nothing(gen):
    """cal.step() after backward (the old place to clip) returns the step's answer and
    neither calibrates again nor advances the state."""
    (model, opt, cal), _ = _twins("bogc")
    cal.backward(model.losses(*batch(gen)))
    grads, state = _grads(model), copy.deepcopy(cal.state_dict())
    assert cal.step() is True and cal.step() is True
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), grads))
    assert cal.state_dict()["step_count"] == state["step_count"] == 1


# ------------------------------------------------------------ requires_grad changes
class WithStem(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(6, 6)
        self.net = TwoView()

    def losses(self, xa, xb, xc, y):
        return self.net.losses(self.stem(xa), xb, xc, y)


def test_unfreezing_a_parameter_after_construction_is_warned_about_once_by_name(gen):
    torch.manual_seed(0)
    model = WithStem()
    model.stem.requires_grad_(False)
    groups = [{"params": model.stem.named_parameters(prefix="stem")},
              {"params": model.net.enc_a.named_parameters(prefix="net.enc_a")}]
    cal = mmgrad.FusedCalibrator(groups, 3, method="mgda")
    model.stem.requires_grad_(True)
    b = batch(gen)
    with pytest.warns(UserWarning, match=r"'stem\.weight' \(shape \(6, 6\)\), 'stem\.bias' .*plain summed gradient"):
        cal.backward(model.losses(*b))
    summed = WithStem()
    summed.load_state_dict(model.state_dict())
    sum(summed.losses(*b)).backward()
    assert rel_err(model.stem.weight.grad, summed.stem.weight.grad) <= 1e-6  # outside calibration, not dropped
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal.backward(model.losses(*b))  # said once


def test_freezing_a_calibrated_parameter_after_construction_leaves_it_unmoved(gen):
    torch.manual_seed(0)
    model = TwoView()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc").attach(opt)
    cal.backward(model.losses(*batch(gen)))
    opt.step()
    opt.zero_grad()
    model.enc_a[0].weight.requires_grad_(False)
    frozen = model.enc_a[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"parameter 0 \(shape \(8, 6\)\) were calibrated and are now frozen"):
        cal.backward(model.losses(*batch(gen)))
    assert model.enc_a[0].weight.grad is None
    opt.step()  # AdamW's decay and momentum would move it if it had a .grad
    assert torch.equal(model.enc_a[0].weight.detach(), frozen)


# ------------------------------------------------------------------------ names
def _named_groups(model):
    return [{"params": model.enc_a.named_parameters(prefix="enc_a")},
            {"params": model.enc_b.named_parameters(prefix="enc_b")}]


def test_named_parameters_are_accepted_and_name_the_nonfinite_one(gen):
    torch.manual_seed(0)
    model = TwoView()
    cal = mmgrad.FusedCalibrator(_named_groups(model), 3, method="mgda")
    assert cal.names == ["enc_a.0.weight", "enc_a.0.bias", "enc_b.0.weight", "enc_b.0.bias"]
    losses = model.losses(*batch(gen))
    losses[2] = losses[2] * float("inf")
    with pytest.raises(mmgrad.NonFiniteGradientError, match=r"objective 2 \(losses\[2\]\) for 'enc_b\.0\.weight' \(shape \(8, 5\)\)"):
        cal.backward(losses)


def test_a_flat_named_parameters_list_is_one_group(gen):
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.enc_a.named_parameters(), 3, method="sum")
    assert len(cal.groups) == 1 and cal.names == ["0.weight", "0.bias"]


@pytest.mark.parametrize("params, error, pattern", [
    (lambda m: m, TypeError, r"not the module: pass TwoView\.parameters\(\) or \.named_parameters\(\)"),
    (lambda m: [{"params": m.enc_a}], TypeError, r"group 0\) holds a module: pass Sequential\.parameters\(\)"),
    (lambda m: {"params": m.enc_a.parameters()}, TypeError, r"not one dict"),
    (lambda m: [*m.enc_a.named_parameters(prefix="enc_a"), ("again", m.enc_a[0].weight)], ValueError,
     r"'again' \(shape \(8, 6\)\) appears twice \(first as 'enc_a\.0\.weight'"),
    (lambda m: [("w", m.enc_a[0].weight * 2)], ValueError, r"'w' \(shape \(8, 6\)\) is not a leaf"),
    (lambda m: [{"params": [m.enc_a[0].weight], "lr": 0.1}], ValueError, r"only the key 'params'"),
    (lambda m: [{"weights": [m.enc_a[0].weight]}], ValueError, r"only the key 'params'"),
    (lambda m: [1.0], TypeError, r"must hold tensors or \(name, tensor\) pairs; got float"),
    (lambda m: 3, TypeError, r"must be an iterable .*got int"),
])
def test_params_misuse_is_named(params, error, pattern):
    with pytest.raises(error, match=pattern):
        mmgrad.FusedCalibrator(params(TwoView()), 3)


def test_a_parameter_of_another_calibrator_is_named():
    model = TwoView()
    keep = mmgrad.FusedCalibrator(_named_groups(model), 3)
    with pytest.raises(ValueError, match=r"'enc_a\.0\.weight' \(shape \(8, 6\)\) is already calibrated by FusedCalibrator"):
        mmgrad.FusedCalibrator(model.enc_a.named_parameters(prefix="enc_a"), 3)
    del keep


def test_plain_losses_to_the_sample_estimator_say_the_shape(gen):
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc", estimator="sample")
    with pytest.raises(ValueError, match=r"losses must be S x M for estimator='sample'.*num_objectives=3"):
        cal.backward(model.losses(*batch(gen)))


# ------------------------------------------------------------------ docs and reprs
def test_the_layout_repr_summarises_segments_and_bytes(gen):
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc")
    assert "[((), 120)]" in repr(cal.layout)  # nothing reached yet
    cal.backward(model.losses(*batch(gen)))
    text = repr(cal.layout)
    assert "segments by reach: [((0, 1), 56), ((0, 2), 48), ((0,), 16)]" in text
    held = cal.memory_bytes()
    assert f"{held['grad_buffer'] + held['ema_state'] + held['output']} bytes" in text


def test_diagnostics_and_layout_are_documented():
    for attr in ("diagnostics", "layout", "step", "backward", "accumulate"):
        doc = getattr(mmgrad.FusedCalibrator, attr, None).__doc__ if attr != "layout" else mmgrad.layout.Layout.__doc__
        assert doc and len(doc) > 80, attr
    doc = mmgrad.FusedCalibrator.__doc__
    for method in EVERY_METHOD:
        assert f'"{method}"' in doc, method


def test_a_step_the_grad_scaler_skipped_ends_the_step(gen):
    """scaler.step skips optimizer.step() on an overflow, so the optimizer hook never sees
    the step end; scaler.update() does, and the next backward starts a new step."""
    (model, opt, cal), _ = _twins("bogc")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = model.losses(*batch(gen))
    cal.backward([losses[0] * 1e38, *losses[1:]], scaler=scaler)  # overflows
    scaler.step(opt)  # skipped: no optimizer.step()
    scaler.update()
    assert scaler.get_scale() == 2.0**7
    cal.backward(model.losses(*batch(gen)), scaler=scaler)  # a new step, not a "second backward"
    scaler.step(opt)
    scaler.update()
    assert cal.step_count == 1
    cal.backward(model.losses(*batch(gen)), scaler=scaler)
    with pytest.raises(RuntimeError, match=r"with cal\.accumulate\(\)"):  # no update since: still refused
        cal.backward(model.losses(*batch(gen)), scaler=scaler)
