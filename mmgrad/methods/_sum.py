"""``sum``: plain joint training, the baseline every comparison needs. One backward of the
summed losses writes ``.grad`` (bit for bit what ``sum(losses).backward()`` does); the
step only checks that it is finite."""

from __future__ import annotations

import torch

from ._base import Method, StepContext, StepResult, all_ranks_ok, decide


class Sum(Method):
    name = "sum"
    uses_rows = False
    family = "sum"
    kernels = ("all_finite",)

    def step(self, ctx: StepContext) -> StepResult:
        params = ctx.layout.params
        m = ctx.layout.num_objectives
        diagnostics = {"weights": torch.full((m,), 1.0 / m, dtype=torch.float64)}
        # FSDP2's gradients are sharded DTensors: each rank checks its shard, all decide together
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in params if p.grad is not None]
        ok = all_ranks_ok(ctx, ctx.ops.all_finite(grads).to(ctx.layout.device))
        if decide(ctx, ok) is False:
            return StepResult(False, lambda: _locate(ctx.layout), diagnostics)
        return StepResult(ok, diagnostics=diagnostics)


def _locate(layout) -> str:
    for i, p in enumerate(layout.params):
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the summed gradient of {layout.label(i)} is not finite"
    return "the summed gradient is not finite"
