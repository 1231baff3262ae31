"""UPGrad and DualProj (Quinton & Rey, 2024): projections onto the dual cone of the
objectives' gradients, per parameter group, solved exactly on the host
(``mmgrad.reference.gramian``: an active-set quadratic program, no QP package), or on
the device by the triton backend (``mmgrad.kernels.triton_dual_cone``; ``sync_free=True``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import _validation as V
from .._constants import DUAL_CONE_DEFAULTS
from ..ops import implements
from ..reference.gramian import gramian_weights
from ._base import StepContext
from ._weighting import Weighting

Tensor = torch.Tensor


class _DualCone(Weighting):
    """Options shared by the dual-cone weightings: the preference vector (None: the mean)
    and the Gramian's normalisation and regularisation epsilons (TorchJD's defaults).
    With ``sync_free=True`` (triton) the device solves them (``reg_eps >= 1e-6``, M <= 16:
    ``sync_free_refusal``); otherwise the host does, exactly and in microseconds."""

    defaults = dict(DUAL_CONE_DEFAULTS)
    sync_free = True

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_dual_cone_options(o["pref_vector"], o["norm_eps"], o["reg_eps"])

    @classmethod
    def sync_free_refusal(cls, options: Dict[str, Any], num_objectives: int) -> Optional[str]:
        return V.dual_cone_device_refusal(num_objectives, options["reg_eps"])

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        V.check_pref_vector(options["pref_vector"], None if layout is None else layout.num_objectives)

    def _options(self) -> Dict[str, Any]:
        return {k: self.options[k] for k in ("pref_vector", "norm_eps", "reg_eps")}

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return gramian_weights(grams, self.name, **self._options())

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        if ctx.sync_free and implements(ctx.ops, "dual_cone_weights"):  # the calibrator checked sync_free_refusal
            return ctx.ops.dual_cone_weights(grams, self.name, **self._options())
        return super().solve(ctx, grams)


class UPGrad(_DualCone):
    """UPGrad: every objective's gradient projected onto the dual cone of all of them (so
    the update conflicts with none), the projections averaged with ``pref_vector``."""

    name = "upgrad"


class DualProj(_DualCone):
    """DualProj: the ``pref_vector``-weighted average projected onto the dual cone."""

    name = "dualproj"
