"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022), per
parameter group: the Nash bargaining weights ``alpha_i (G alpha)_i = 1``, found exactly by
damped Newton on the host (``mmgrad.reference.gramian.nash_mtl_weights``), the group's
update clipped to norm ``max_norm``.

The official code solves with cvxpy a few sequential convex programs per step and offers
``update_weights_every`` to amortise that cost; mmgrad's solve is exact and costs well
under a millisecond, so it solves every step and has no such option."""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..reference.gramian import gramian_weights
from ._weighting import Weighting

Tensor = torch.Tensor


class NashMTL(Weighting):
    """Option: ``max_norm`` (the largest norm of a group's update, 0: no clipping; the
    official default 1)."""

    name = "nash_mtl"
    defaults = {"max_norm": 1.0}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        v = o["max_norm"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"max_norm must be a finite number >= 0 (0: no clipping); got {v!r}")

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return gramian_weights(grams, self.name, max_norm=self.options["max_norm"])
