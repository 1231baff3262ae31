"""The sync-free calibrator step on the triton backend, in Triton's interpreter
(its device MOO solver: tests/test_device_solver.py).

"No host synchronisation" is checked the way it would show on a GPU: no scalar is read
back (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``int()``) and no shape
depends on data (``nonzero``) while the calibrator and the optimizer step.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton", reason="triton is not installed")

import mmgrad
from mmgrad import ops

from toy_model import TwoView, batch


class NoHostReads(TorchDispatchMode):
    """Fails on the ops that make a GPU wait for the host: a scalar read-back or a data-dependent shape."""

    SYNCING = ("_local_scalar_dense", "nonzero", "item")
    # Parameter-group offsets live on the CPU in every backend (host metadata, checked
    # on each call); reading them is no device synchronisation.
    HOST_METADATA = ("check_group_offsets",)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            if not any(f.name in self.HOST_METADATA for f in traceback.extract_stack()):
                raise AssertionError(f"host synchronisation in a sync-free step: {func}")
        return func(*args, **(kwargs or {}))


def _train(method, sync_free, data, poison_at=None, options=None):
    torch.manual_seed(0)
    model = TwoView()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, backend="triton", skip_nonfinite=True,
                                 sync_free=sync_free, **(options or {})).attach(opt)
    sample = (options or {}).get("estimator") == "sample"
    for i, d in enumerate(data):
        losses = [model.losses(*b) for b in d] if sample else model.losses(*d)
        if i == poison_at:
            row = losses[0] if sample else losses
            row[1] = row[1] * torch.tensor(float("inf"))
        cal.backward(losses)
        if sync_free:
            with NoHostReads():
                opt.step()
            assert float(cal.found_inf) == float(i == poison_at)
        else:
            opt.step()
        opt.zero_grad()
    return model, opt, cal


@pytest.mark.parametrize("method, options", [("bogc", {}), ("mgda", {}), ("mmpareto", {"lagged": True}), ("mimo", {}),
                                             ("bogc", {"estimator": "sample"}), ("ogm", {"group_objectives": [1, 2, 2], "modulate": "all"}),
                                             ("mean", {}), ("dualproj", {"pref_vector": [0.5, 0.2, 0.3]})])
def test_sync_free_step_trains_like_the_host_step_and_skips_on_device(gen, method, options):
    sample = options.get("estimator") == "sample"
    data = [[batch(gen, 8) for _ in range(2)] if sample else batch(gen) for _ in range(5)]
    runs = [_train(method, sf, data, poison_at=2, options=options) for sf in (False, True)]
    (host, _, host_cal), (dev, dev_opt, dev_cal) = runs
    for p, q in zip(host.parameters(), dev.parameters()):
        tol = 1e-4 if method in ("mgda", "mmpareto") else 1e-6  # the device MGDA solver stops at the same certificate
        # (the dual-cone solver's weights are the host's to 1e-8: tests/test_device_dual_cone.py)
        assert torch.allclose(p, q, rtol=0, atol=tol), (p - q).abs().max()
    assert dev_cal.state_dict()["step_count"] == host_cal.state_dict()["step_count"] == 4  # one step skipped
    assert "found_inf" not in vars(dev_opt)  # the flag is only there during the step


def test_sync_free_misuse():
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="sync_free=True needs skip_nonfinite=True"):
        mmgrad.FusedCalibrator(layer.parameters(), 2, backend="triton", sync_free=True)
    with pytest.raises(ValueError, match="sync_free=True needs a backend that solves on the device"):
        mmgrad.FusedCalibrator(layer.parameters(), 2, backend="reference", sync_free=True, skip_nonfinite=True)
    assert mmgrad.FusedCalibrator([layer.bias], 2, backend="triton").found_inf is None  # host mode: step() says it
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2, backend="triton", sync_free=True, skip_nonfinite=True)
    with pytest.raises(TypeError, match="fused=True"):
        cal.attach(torch.optim.AdamW(layer.parameters()))
    with pytest.raises(ValueError, match="triton backend.s MOO solver takes 1 <= M <= 16"):
        ops.moo_weights(torch.eye(17, dtype=torch.float64)[None], "mgda", backend="triton")
    with pytest.raises(ValueError, match="method must be one of"):  # not a Gramian method at all
        ops.moo_weights(torch.eye(3, dtype=torch.float64)[None], "sum", backend="triton")
