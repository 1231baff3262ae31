"""``mmgrad.CalibratorState``: the calibrator through torch.distributed.checkpoint in one
process (tests/test_distributed.py resumes a world-2 checkpoint at worlds 4 and 1)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp

import mmgrad

from conftest import assert_bit_identical
from toy_model import TwoView, batch

CASES = [("bogc", {}), ("mgda", {"lagged": True}), ("mimo", {}), ("bogc", {"state_dtype": torch.bfloat16})]


def _trained(method, options, gen, steps=3):
    torch.manual_seed(0)
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, **options)
    for _ in range(steps):
        cal.backward(model.losses(*batch(gen)))
        model.zero_grad()
    return model, cal


@pytest.mark.parametrize("method, options", CASES)
def test_a_dcp_checkpoint_restores_the_calibrator_bit_for_bit(tmp_path, gen, method, options):
    model, cal = _trained(method, options, gen)
    dcp.save({"calibrator": mmgrad.CalibratorState(cal)}, checkpoint_id=str(tmp_path))
    saved = copy.deepcopy(cal.state_dict())
    twin = copy.deepcopy(model)
    fresh = mmgrad.FusedCalibrator(twin.groups(), 3, method=method, **options)  # no reach, no state yet
    dcp.load({"calibrator": mmgrad.CalibratorState(fresh)}, checkpoint_id=str(tmp_path))
    assert_bit_identical(fresh.state_dict(), saved)
    b = batch(gen)  # and both take the next step alike
    cal.backward(model.losses(*b))
    fresh.backward(twin.losses(*b))
    for p, q in zip(cal.params, fresh.params):
        assert torch.equal(p.grad, q.grad)


def test_the_dcp_form_is_dense_per_parameter_with_the_reach(gen):
    _, cal = _trained("bogc", {}, gen, steps=1)
    state = mmgrad.CalibratorState(cal).state_dict()
    assert state["format"] == "dcp-1" and state["num_elements"] == cal.num_elements
    assert state["reach"][0] == (0, 1) and state["reach"][2] == (0, 2)
    mean = state["mean.0"]  # enc_a's weight: rows 0 and 1 held, row 2 never reached
    assert mean.shape == (3, *cal.params[0].shape)
    assert mean[[0, 1]].abs().sum() > 0 and not mean[2].any()


def test_loading_something_else_is_refused(gen):
    _, cal = _trained("bogc", {}, gen, steps=1)
    state = mmgrad.CalibratorState(cal).state_dict()
    other = TwoView()
    target = mmgrad.CalibratorState(mmgrad.FusedCalibrator(other.groups(), 3, method="mgda"))
    with pytest.raises(ValueError, match="state method='bogc' does not match"):
        target.load_state_dict(state)
    with pytest.raises(ValueError, match="CalibratorState loads what it saved"):
        target.load_state_dict(cal.state_dict())  # a per-rank state dict
    with pytest.raises(TypeError, match="calibrator must be a FusedCalibrator"):
        mmgrad.CalibratorState(cal.layout)


def test_a_refused_dcp_load_leaves_the_calibrator_as_it_was(gen):
    """The rows are cut by the saved reach without laying it out: a state the calibrator
    refuses (here another method option) changes nothing, the reach included."""
    _, cal = _trained("bogc", {}, gen, steps=1)
    state = mmgrad.CalibratorState(cal).state_dict()
    state["options"] = {**state["options"], "beta": 0.5}
    fresh = mmgrad.FusedCalibrator(TwoView().groups(), 3, method="bogc")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="beta=0.5"):
        mmgrad.CalibratorState(fresh).load_state_dict(state)
    assert_bit_identical(fresh.state_dict(), before)
