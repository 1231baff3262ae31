"""MGDA and MMPareto (docs/spec.md §4): Gramian weightings (``Weighting``) solved by the backend's
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
    """MMPareto (Wei & Hu, ICML 2024), as its official training step computes it.

    Per parameter group (an encoder), from the group's Gram matrix: the direction weights
    ``c = n * alpha`` over the n objectives that reach it, ``alpha`` uniform when every
    pair of their gradients has a positive cosine, else MGDA's min-norm point. Then per
    parameter tensor (``scope="tensor"``, the default, as the official step does per
    ``param``): ``new = sum_m c_m g_m`` on that tensor, scaled up, never down, to the
    norm of the tensor's summed gradient ``||sum_m g_m||``, then by ``magnitude`` (1.5).
    ``scope="group"`` applies that rule once to the whole group (mmgrad's variant: one
    norm per encoder). With two objectives per group (the fused loss and the encoder's
    unimodal one) this is the official rule; with more, "positive cosine" means every pair.
    A tensor whose ``new`` is zero keeps it (the official code would divide 0 by 0).
    """

    name = "mmpareto"
    defaults = {"magnitude": 1.5, "scope": "tensor"}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_positive("magnitude", o["magnitude"])
        V.check_choice("scope", o["scope"], ("tensor", "group"))

    @property
    def scope(self) -> str:
        return self.options["scope"]

    @classmethod
    def saved_options(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        return {"scope": "group", **options}  # mmgrad before 0.4 applied the rule per group

    def solve_tensors(self, ctx: StepContext, group_grams: Tensor, tensor_grams: Tensor) -> Tensor:
        shares = self.direction(ctx, group_grams)[torch.tensor(ctx.layout.group_of, device=tensor_grams.device)]
        new_sq = torch.einsum("pm,pmn,pn->p", shares, tensor_grams, shares)
        total_sq = tensor_grams.sum(dim=(1, 2))
        boost = torch.where(new_sq > 0, (total_sq / torch.where(new_sq > 0, new_sq, 1.0)).sqrt(), 1.0).clamp_min(1.0)
        return shares * boost[:, None] * self.options["magnitude"]

    @staticmethod
    def direction(ctx: StepContext, grams: Tensor) -> Tensor:
        """``G x M`` direction weights ``c = n * alpha`` (zero for the objectives that do
        not reach a group), on the device: the backend's min-norm solve where some pair
        of reaching gradients does not agree (cosine <= 0)."""
        reach = torch.diagonal(grams, dim1=1, dim2=2) > 0
        n = reach.sum(dim=1, keepdim=True).to(grams.dtype)
        pair = reach[:, :, None] & reach[:, None, :]
        conflict = ((grams <= 0) & pair).any(dim=2).any(dim=1, keepdim=True)  # the diagonal of a pair is > 0
        min_norm = ctx.ops.moo_weights(grams, "mgda")
        return torch.where(conflict, n * min_norm, reach.to(grams.dtype))

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return moo_weights(grams.cpu(), "mmpareto", magnitude=self.options["magnitude"]).to(grams.device)

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        return ctx.ops.moo_weights(grams, "mmpareto", magnitude=self.options["magnitude"])
