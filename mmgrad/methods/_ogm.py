"""OGM-GE (SPEC §4; Peng et al., CVPR 2022): on-the-fly gradient modulation with
generalisation enhancement, for objectives ``[fused, view_1, ..., view_V]``.

Each parameter group is one view's encoder and names that view's objective
(``group_objectives``; by default group g is view g + 1 when there are M - 1 groups). Per
step, the dominant views' encoders get the fused gradient scaled down by
``k_v = 1 - tanh(alpha * rho_v)`` (``mmgrad.reference.ogm_coefficients``), through the
backend's fused combination: group v's gradient is ``k_v g_fused + unimodal g_v``. GE
then adds Gaussian noise of the modulated gradient's standard deviation over the group.

The noise is counter-based: the value at element i of parameter p on committed step t is
a function of ``(seed, t, p, i)`` alone (``ge_noise``). So a skipped step draws nothing
that a later step would miss: the sync-free step, which cannot know on the host whether
it commits, adds the same noise as the host-driven one, a resumed run adds the same noise
as an uninterrupted one from the step count alone, and a rank holding a slice of a
parameter computes just that slice.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from .. import _validation as V
from ..reference.moo import ogm_coefficients
from ._base import (Method, StepContext, StepResult, all_reduce_sum, check_losses, combine_segments, decide,
                    locate_nonfinite, weighted_diagnostics)

Tensor = torch.Tensor


class OGM(Method):
    name = "ogm"
    defaults = {"alpha": 0.5, "unimodal": 0.0, "noise": True, "seed": 0, "group_objectives": None}

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        self.objectives = self._group_objectives(options["group_objectives"], layout.num_groups, layout.num_objectives)

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        V.check_positive("alpha", o["alpha"])
        if isinstance(o["unimodal"], bool) or not isinstance(o["unimodal"], (int, float)) or o["unimodal"] < 0:
            raise ValueError(f"unimodal must be a number >= 0; got {o['unimodal']!r}")
        if not isinstance(o["noise"], bool):
            raise TypeError(f"noise must be a bool; got {type(o['noise']).__name__}")
        if isinstance(o["seed"], bool) or not isinstance(o["seed"], int):
            raise TypeError(f"seed must be an int; got {type(o['seed']).__name__}")

    @staticmethod
    def _group_objectives(given: Optional[List[int]], groups: int, m: int) -> List[int]:
        if given is None:
            if groups != m - 1:
                raise ValueError(f"group_objectives: give each of the {groups} parameter groups the index of its view's "
                                 f"objective (the default, one group per view, needs M - 1 = {m - 1} groups)")
            return list(range(1, m))
        if not isinstance(given, (list, tuple)) or len(given) != groups:
            raise ValueError(f"group_objectives must list one objective per parameter group ({groups}); got {given!r}")
        for o in given:
            if isinstance(o, bool) or not isinstance(o, int) or not 1 <= o < m:
                raise ValueError(f"group_objectives must name view objectives in [1, {m - 1}] (0 is the fused one); got {o!r}")
        return list(given)

    def step(self, ctx: StepContext) -> StepResult:
        lay, o = ctx.layout, self.options
        ok, failed = check_losses(ctx)
        if failed is not None:
            return failed
        views = sorted(set(self.objectives))
        k_view, rho_view = ogm_coefficients(torch.nan_to_num(ctx.loss_values.to(torch.float64))[views], o["alpha"])
        at = {v: i for i, v in enumerate(views)}
        k = torch.stack([k_view[at[v]] for v in self.objectives])
        rho = torch.stack([rho_view[at[v]] for v in self.objectives])
        alpha = torch.zeros(lay.num_groups, lay.num_objectives, dtype=torch.float64, device=k.device)
        alpha[:, 0] = k
        alpha[torch.arange(lay.num_groups), torch.tensor(self.objectives)] += float(o["unimodal"])
        nonfinite, _ = combine_segments(ctx, alpha, with_gram=False)
        ok = ok & (nonfinite == 0)
        if decide(ctx, ok) is False:
            return StepResult(False, lambda: locate_nonfinite(lay))
        diagnostics = {**weighted_diagnostics(alpha, None), "ogm_coefficients": k, "ogm_ratio": rho}
        if o["noise"]:
            diagnostics["noise_std"] = self._add_noise(ctx)
        return StepResult(ok, diagnostics=diagnostics)

    def _add_noise(self, ctx: StepContext) -> Tensor:
        """GE: N(0, sigma_g^2) on group g's output, sigma_g its (unbiased) standard deviation
        over the group's coordinates; each element's draw from ``ge_noise``."""
        lay = self.layout
        views = lay.out_views
        sums = torch.zeros(lay.num_groups, 3, dtype=torch.float64, device=lay.device)  # n, sum, sum of squares
        for i, g in enumerate(lay.group_of):
            x = views[i].to(torch.float64)
            sums[g] += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=lay.device), x.sum(), (x * x).sum()])
        n, s1, s2 = all_reduce_sum(ctx, [sums])[0].unbind(1)
        sigma = torch.sqrt(torch.clamp_min((s2 - s1 * s1 / n) / torch.clamp_min(n - 1, 1.0), 0.0))
        step = ctx.steps + 1  # the step being taken: a skipped one leaves it to the next
        for i, g in enumerate(lay.group_of):
            # the flat index of this rank's first element: its first row of dim 0 times a row's size
            first = 0 if lay.shards is None else lay.shards[i][0] * math.prod(lay.params[i].shape[1:])
            noise = ge_noise(self.options["seed"], step, i, first, views[i].numel(), lay.device)
            views[i].add_((noise * sigma[g].to(torch.float32)).to(views[i].dtype).reshape(views[i].shape))
        return sigma

    # No state: the noise is a function of (seed, step count), and the checkpoint has the
    # step count. Checkpoints of earlier versions carry a "generator" state, ignored.


_M32 = 0xFFFFFFFF


def _pcg(x: Tensor) -> Tensor:
    """PCG's RXS-M-XS permutation of 32-bit values held in int64 (no product exceeds 2^62)."""
    x = (x * 747796405 + 2891336453) & _M32
    x = (((x >> ((x >> 28) + 4)) ^ x) * 277803737) & _M32
    return (x >> 22) ^ x


def ge_noise(seed: int, step, param: int, first: int, count: int, device) -> Tensor:
    """Standard normal draws for elements ``first .. first + count - 1`` of parameter
    ``param`` on step ``step`` (an int, or a 0-dim device tensor: no host read), float32.

    Two 32-bit hashes of (seed, step, param, element) make a Box-Muller pair; the tails
    reach 6.7 sigma, plenty for GE's regulariser.

    >>> a = ge_noise(0, 3, 1, 0, 100_000, "cpu")
    >>> torch.equal(a[10:20], ge_noise(0, 3, 1, 10, 10, "cpu")), round(float(a.std()), 1)
    (True, 1.0)
    """
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    key = _pcg(torch.full((), seed & _M32, dtype=torch.int64, device=device))
    key = _pcg(key ^ (step & _M32))
    key = _pcg(key ^ (param & _M32))
    idx = torch.arange(first, first + count, dtype=torch.int64, device=device) & _M32
    h1 = _pcg(key ^ idx)
    h2 = _pcg(h1 ^ 0x9E3779B9)
    u1 = (h1.to(torch.float64) + 1.0) / 4294967296.0  # (0, 1]
    u2 = h2.to(torch.float64) / 4294967296.0
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(torch.float32)
