"""MGDA and MMPareto (SPEC §4): Gramian weightings (``Weighting``) with the backends' own
min-norm solvers (host Wolfe on the cpu backend, the device solver on triton and cuda)."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _validation as V
from ..reference.moo import moo_weights
from ._base import StepContext
from ._weighting import Weighting

Tensor = torch.Tensor


class MGDA(Weighting):
    name = "mgda"
    defaults = {"normalize": "none"}
    sync_free = True

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_choice("normalize", o["normalize"], V.MGDA_NORMALIZATIONS)

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return moo_weights(grams.cpu(), "mgda", normalize=self.options["normalize"], losses=losses.cpu()).to(grams.device)

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        loss = ctx.loss_values if self.options["normalize"] == "loss" else None
        return ctx.ops.moo_weights(grams, "mgda", normalize=self.options["normalize"], losses=loss)


class MMPareto(Weighting):
    name = "mmpareto"
    defaults = {"magnitude": 1.5}
    sync_free = True

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_positive("magnitude", o["magnitude"])

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return moo_weights(grams.cpu(), "mmpareto", magnitude=self.options["magnitude"]).to(grams.device)

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        return ctx.ops.moo_weights(grams, "mmpareto", magnitude=self.options["magnitude"])
