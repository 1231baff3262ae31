"""UPGrad and DualProj (Quinton & Rey, 2024): projections onto the dual cone of the
objectives' gradients, per parameter group, solved exactly on the host
(``mmgrad.reference.gramian``: an active-set quadratic program, no QP package)."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _validation as V
from ..reference.gramian import gramian_weights
from ._weighting import Weighting

Tensor = torch.Tensor


class _DualCone(Weighting):
    """Options shared by the dual-cone weightings: the preference vector (None: the mean)
    and the Gramian's normalisation and regularisation epsilons (TorchJD's defaults)."""

    defaults = {"pref_vector": None, "norm_eps": 1e-4, "reg_eps": 1e-4}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        check_pref_vector(o["pref_vector"])
        for name in ("norm_eps", "reg_eps"):
            if isinstance(o[name], bool) or not isinstance(o[name], (int, float)) or not o[name] >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {o[name]!r}")

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        check_pref_length(options["pref_vector"], layout)

    def _options(self) -> Dict[str, Any]:
        return {k: self.options[k] for k in ("pref_vector", "norm_eps", "reg_eps")}


def check_pref_vector(pref: Any) -> None:
    """None, or a list of non-negative finite numbers (its length is checked against M at the step)."""
    if pref is None:
        return
    if not isinstance(pref, (list, tuple)) or not pref or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < float("inf") for x in pref):
        raise ValueError(f"pref_vector must be None or a list of numbers >= 0, one per objective; got {pref!r}")


def check_pref_length(pref: Any, layout) -> None:
    if pref is not None and layout is not None and len(pref) != layout.num_objectives:
        raise ValueError(f"pref_vector must hold one value per objective (M = {layout.num_objectives}); got {len(pref)}")


class UPGrad(_DualCone):
    """UPGrad: every objective's gradient projected onto the dual cone of all of them (so
    the update conflicts with none), the projections averaged with ``pref_vector``."""

    name = "upgrad"

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return gramian_weights(grams, self.name, **self._options())


class DualProj(_DualCone):
    """DualProj: the ``pref_vector``-weighted average projected onto the dual cone."""

    name = "dualproj"

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return gramian_weights(grams, self.name, **self._options())
