"""MGDA and MMPareto (SPEC §4): Gramian weightings (``Weighting``) solved by the backend's
``moo_weights`` (csrc/mmgrad_math.h's interior-point solver on cpu and cuda, its Triton
mirror on triton, Wolfe's method on the reference)."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, Optional

import torch

from .. import _validation as V
from ..reference.moo import moo_weights
from ._base import StepContext
from ._weighting import Weighting

Tensor = torch.Tensor


class _DeviceSolved(Weighting):
    """A weighting whose ``solve`` is the backend's ``moo_weights`` (sync-free on triton)."""

    kernels = (*Weighting.kernels, "moo_weights")
    sync_free = True

    @classmethod
    def unsupported(cls, backend: ModuleType, num_objectives: int) -> Optional[str]:
        limit = getattr(backend, "MOO_MAX_OBJECTIVES", None)  # the reference's solver has none
        if limit is not None and num_objectives > limit:
            return f"its MOO solver takes at most {limit} objectives, not M = {num_objectives} (backend='reference' solves any M)"
        return super().unsupported(backend, num_objectives)


class MGDA(_DeviceSolved):
    name = "mgda"
    defaults = {"normalize": "none"}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_choice("normalize", o["normalize"], V.MGDA_NORMALIZATIONS)

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return moo_weights(grams.cpu(), "mgda", normalize=self.options["normalize"], losses=losses.cpu()).to(grams.device)

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        loss = ctx.loss_values if self.options["normalize"] == "loss" else None
        return ctx.ops.moo_weights(grams, "mgda", normalize=self.options["normalize"], losses=loss)


class MMPareto(_DeviceSolved):
    name = "mmpareto"
    defaults = {"magnitude": 1.5}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_positive("magnitude", o["magnitude"])

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return moo_weights(grams.cpu(), "mmpareto", magnitude=self.options["magnitude"]).to(grams.device)

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        return ctx.ops.moo_weights(grams, "mmpareto", magnitude=self.options["magnitude"])
