"""The calibration step of ``FusedCalibrator(..., sync_free=True)``: no host synchronisation.

The host-side step reads three things back from the device: the count of non-finite
gradients (to raise or skip), the MOO weights (solved on the host) and, for BOGC, which
EMA slot holds the last finite state. Here all three stay on the device:

* the weights come from the backend's one-program solver (``moo_weights``);
* the EMA state is double-buffered as before, and the slot to read is a device tensor
  the kernel loads; it flips only when the step was finite (``torch.where``);
* ``found_inf`` (a 0-dim float tensor) tells the optimizer to skip, through the same
  protocol ``GradScaler`` uses with fused optimizers (``optimizer.found_inf``).

So a step is a fixed sequence of kernel launches, capturable in a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .calibrator import FusedCalibrator

Tensor = torch.Tensor


def all_finite(tensors: List[Tensor]) -> Tensor:
    """0-dim bool on the device: every entry of every tensor is finite. One read each (their
    max-norms are inf/NaN exactly when an entry is); True for no tensors."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all()


class DeviceStep:
    """Device-resident step state (slot, committed step count, found_inf) and the step."""

    def __init__(self, cal: "FusedCalibrator") -> None:
        self.cal = cal
        dev = cal.device
        self.slot = torch.zeros((), dtype=torch.int64, device=dev)
        self.steps = torch.zeros((), dtype=torch.int64, device=dev)  # committed (finite) steps
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)
        self.prev_alpha: Optional[Tensor] = None

    def run(self) -> None:
        cal = self.cal
        if cal.method == "sum":
            ok = all_finite([p.grad for p in cal.params if p.grad is not None]).to(cal.device)
        elif cal.method == "bogc":
            ok = self._bogc()
        else:
            ok = self._weighted()
        self.steps += ok.to(torch.int64)
        self.found_inf.copy_((~ok).to(torch.float32))
        if cal.method != "sum":
            cal._write_out_grads()

    def _bogc(self) -> Tensor:
        cal, o, kw = self.cal, self.cal.options, self.cal._bogc_kwargs()
        if o["estimator"] == "sample":
            _, stats = cal._ops.bogc_sample_step(cal._grads, **kw)
            ok = stats["nonfinite"] == 0
        else:
            _, stats = cal._ops.bogc_step_slots(cal._grads, cal._m, cal._v, self.slot, self.steps + 1, beta=o["beta"], **kw)
            ok = stats["nonfinite"] == 0
            self.slot.copy_(torch.where(ok, 1 - self.slot, self.slot))
        cal._set_bogc_diagnostics(stats)
        return ok

    def _weighted(self) -> Tensor:
        cal, o, m = self.cal, self.cal.options, self.cal.num_objectives
        groups = cal.group_offsets.numel() - 1
        losses = cal._loss_values  # on the device in this mode
        ok = torch.isfinite(losses).all()
        grams = None
        if cal.method == "mimo":
            f = torch.nan_to_num(losses, nan=0.0, posinf=0.0, neginf=0.0)  # a bad loss is flagged by ok
            w = torch.cat([torch.ones_like(f[:1]), o["rho"] * torch.softmax(f[1:] / o["tau"], dim=0)])
            alpha = w.expand(groups, m).contiguous()
        elif cal.method == "mean":
            alpha = torch.full((groups, m), 1.0 / m, dtype=torch.float64, device=cal.device)
        elif o["lagged"] and self.prev_alpha is not None:
            alpha = self.prev_alpha
        else:
            grams = cal._ops.gram(cal._grads, group_offsets=cal.group_offsets)
            alpha = cal._solve(grams)
        lagged = cal.method in ("mgda", "mmpareto") and o["lagged"]
        _, stats = cal._ops.combine_and_gram(cal._grads, alpha, group_offsets=cal.group_offsets, out=cal._out, with_gram=lagged)
        ok = ok & (stats["nonfinite"] == 0) & torch.isfinite(alpha).all()
        if lagged:
            grams = stats["gram"]
            fresh = cal._solve(torch.nan_to_num(grams))
            self.prev_alpha = fresh if self.prev_alpha is None else torch.where(ok, fresh, self.prev_alpha)
        cal._set_weighted_diagnostics(alpha, grams)
        return ok
