"""MGDA and MMPareto (SPEC §4): per-group weights from the Gram matrices, then one combination.

The Gram matrices come from every segment's rows (a segment adds its ``|R| x |R|`` block
to its groups' ``M x M``; an objective that reaches no segment of a group keeps a zero
row, and so weight 0, as in the dense layout). ``lagged=True`` combines with the
previous step's weights and takes the next Gram from the same read.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import _validation as V
from ._base import (Method, StepContext, StepResult, combine_segments, decide, locate_nonfinite, per_group_gram,
                    weighted_diagnostics)

Tensor = torch.Tensor


class _MinNormFamily(Method):
    """The step both share; subclasses say how to solve the weights from the Gram matrices."""

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        self.prev_alpha: Optional[Tensor] = None

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, ctx: StepContext) -> StepResult:
        lay, lagged = ctx.layout, self.options["lagged"]
        ok = torch.ones((), dtype=torch.bool, device=lay.device)
        grams = None
        if lagged and self.prev_alpha is not None:
            alpha = self.prev_alpha  # one read: combine with last step's weights, Gram for the next
        else:
            grams = per_group_gram(ctx)
            ok = torch.isfinite(grams).all()  # K_mm = sum g^2 is inf/NaN iff row m is
            if decide(ctx, ok) is False:
                return StepResult(False, lambda: locate_nonfinite(lay))
            alpha = self.solve(ctx, grams if not ctx.sync_free else torch.nan_to_num(grams))
        nonfinite, next_grams = combine_segments(ctx, alpha, with_gram=lagged)
        ok = ok & (nonfinite == 0) & torch.isfinite(alpha).all()
        if decide(ctx, ok) is False:
            return StepResult(False, lambda: locate_nonfinite(lay))
        if lagged:
            grams = next_grams
            fresh = self.solve(ctx, torch.nan_to_num(grams) if ctx.sync_free else grams)
            self.prev_alpha = fresh if self.prev_alpha is None or not ctx.sync_free else torch.where(ok, fresh, self.prev_alpha)
        return StepResult(ok, diagnostics=weighted_diagnostics(alpha, grams))

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.prev_alpha is None else {"prev_alpha": self.prev_alpha.clone()}

    def check_state(self, state: Dict[str, Any], segments) -> None:
        prev = state.get("prev_alpha")
        want = (self.layout.num_groups, self.layout.num_objectives)
        if prev is not None and (not isinstance(prev, Tensor) or tuple(prev.shape) != want):
            raise ValueError(f"state prev_alpha must be the G x M = {want} lagged weights; got "
                             f"{tuple(prev.shape) if isinstance(prev, Tensor) else type(prev).__name__}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        prev = state.get("prev_alpha")
        self.prev_alpha = None if prev is None else prev.clone().to(self.layout.device)


class MGDA(_MinNormFamily):
    name = "mgda"
    defaults = {"normalize": "none", "lagged": False}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        V.check_choice("normalize", o["normalize"], V.MGDA_NORMALIZATIONS)

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        loss = ctx.loss_values if self.options["normalize"] == "loss" else None
        return ctx.ops.moo_weights(grams, "mgda", normalize=self.options["normalize"], losses=loss)


class MMPareto(_MinNormFamily):
    name = "mmpareto"
    defaults = {"magnitude": 1.5, "lagged": False}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        V.check_positive("magnitude", o["magnitude"])

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        return ctx.ops.moo_weights(grams, "mmpareto", magnitude=self.options["magnitude"])
