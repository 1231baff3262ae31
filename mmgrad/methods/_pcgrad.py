"""PCGrad (Yu et al., NeurIPS 2020) as a Gramian weighting, per parameter group: each
objective's gradient is projected off those it conflicts with, in a random order. The
orders are a function of (``seed``, committed step, group, objective) alone, so a resumed
or a sync-checked run draws the same ones with no generator state to carry."""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..reference.gramian import gramian_weights, pcgrad_orders
from ._base import StepContext
from ._weighting import Weighting

Tensor = torch.Tensor

__all__ = ["PCGrad", "pcgrad_orders"]


class PCGrad(Weighting):
    name = "pcgrad"
    defaults = {"seed": 0}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        if isinstance(o["seed"], bool) or not isinstance(o["seed"], int) or o["seed"] < 0:
            raise ValueError(f"seed must be an int >= 0; got {o['seed']!r}")

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        # the step being taken (the lagged solve's too: it serves the next)
        return self._weights_on_step(grams, int(ctx.steps) + 1)

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:  # the orders of step 1
        return self._weights_on_step(grams, 1)

    def _weights_on_step(self, grams: Tensor, step: int) -> Tensor:
        return gramian_weights(grams, "pcgrad", seed=self.options["seed"], step=step)
