"""MIMO and the mean (docs/spec.md §4): weights that need no Gram matrix, then one combination."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _validation as V
from ..reference.moo import mimo_weights
from ._base import (Method, StepContext, StepResult, check_losses, combine_segments, decide, locate_nonfinite,
                    weighted_diagnostics)

Tensor = torch.Tensor


class _FixedWeights(Method):
    def weights(self, ctx: StepContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, ctx: StepContext) -> StepResult:
        lay = ctx.layout
        ok, failed = check_losses(ctx)
        if failed is not None:
            return failed
        w = self.weights(ctx).to(device=lay.device, dtype=torch.float64)
        alpha = w.expand(lay.num_groups, lay.num_objectives).contiguous()
        nonfinite, _ = combine_segments(ctx, alpha, with_gram=False)
        ok = ok & (nonfinite == 0)
        if decide(ctx, ok) is False:
            return StepResult(False, lambda: locate_nonfinite(lay))
        return StepResult(ok, diagnostics=weighted_diagnostics(alpha, None))


class MIMO(_FixedWeights):
    name = "mimo"
    defaults = {"rho": 1.0, "tau": 1.0}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        V.check_positive("rho", o["rho"])
        V.check_positive("tau", o["tau"])

    def weights(self, ctx: StepContext) -> Tensor:
        rho, tau = self.options["rho"], self.options["tau"]
        if not ctx.sync_free:
            return mimo_weights(ctx.loss_values, rho, tau)
        # on the device, without the host check: a bad loss is flagged by the step's ok
        f = torch.nan_to_num(ctx.loss_values, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.cat([torch.ones_like(f[:1]), rho * torch.softmax(f[1:] / tau, dim=0)])


class Mean(_FixedWeights):
    name = "mean"

    def weights(self, ctx: StepContext) -> Tensor:
        m = ctx.layout.num_objectives
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
