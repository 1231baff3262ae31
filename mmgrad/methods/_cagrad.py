"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021), per parameter group: the update that maximises the worst objective's
improvement within a ball of radius ``c ||g0||`` around the mean gradient ``g0``, from
the Gramian, solved exactly on the host (``mmgrad.reference.gramian.cagrad_weights``)."""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..reference.gramian import CAGRAD_RESCALES, gramian_weights
from ._weighting import Weighting

Tensor = torch.Tensor


class CAGrad(Weighting):
    """Options: ``c`` (the ball's radius over ``||g0||``; 0 is the mean), ``rescale`` (the
    official code's division of the update: 0 none, 1 by ``1 + c^2``, 2 by ``1 + c``; TorchJD's
    CAGrad is ``rescale=0``), ``norm_eps`` (TorchJD's threshold on the normalised Gramian)."""

    name = "cagrad"
    defaults = {"c": 0.5, "rescale": 1, "norm_eps": 1e-4}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        for name in ("c", "norm_eps"):
            if isinstance(o[name], bool) or not isinstance(o[name], (int, float)) or not 0 <= o[name] < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0; got {o[name]!r}")
        if isinstance(o["rescale"], bool) or o["rescale"] not in CAGRAD_RESCALES:
            raise ValueError(f"rescale must be one of {CAGRAD_RESCALES}; got {o['rescale']!r}")

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        o = self.options
        return gramian_weights(grams, self.name, c=o["c"], rescale=o["rescale"], norm_eps=o["norm_eps"])
