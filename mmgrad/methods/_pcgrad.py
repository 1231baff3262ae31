"""PCGrad (Yu et al., NeurIPS 2020) as a Gramian weighting, per parameter group: each
objective's gradient is projected off those it conflicts with, in a random order. The
orders are a function of (``seed``, committed step, group, objective) alone, so a resumed
or a sync-checked run draws the same ones with no generator state to carry."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..reference.gramian import pcgrad_weights
from ._base import StepContext
from ._weighting import Weighting

Tensor = torch.Tensor


def pcgrad_orders(seed: int, step: int, group: int, m: int) -> List[List[int]]:
    """The projection order of each of the M objectives in ``group`` on ``step``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + group)
    return [torch.randperm(m, generator=gen).tolist() for _ in range(m)]


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
        m = grams.shape[1]
        return torch.stack([pcgrad_weights(k.cpu(), pcgrad_orders(self.options["seed"], step, g, m))
                            for g, k in enumerate(grams)]).to(grams.device)
