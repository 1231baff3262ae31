"""OGM-GE (Peng et al., CVPR 2022): on-the-fly gradient modulation with generalisation
enhancement, as the official training step (GeWu-Lab/OGM-GE_CVPR2022, ``main.py``)
computes it.

Each parameter group is one view's encoder. Per step, each view has a score ``s_v``: the
summed true-class probability of its share of the fused head's logits (``ogm_scores``,
given as ``backward(losses, scores=...)``); without scores, ``exp(-loss_v)`` of the view's
own objective stands in (mmgrad's variant, and its behaviour before 0.4). The dominant
views' encoders get the fused gradient scaled by ``k_v = 1 - tanh(alpha * rho_v)``
(``rho_v = mean_{u != v} s_v / s_u > 1``; ``mmgrad.reference.ogm_coefficients``), on the
tensors the official step modulates: the 4-D (convolution) weights (``modulate="conv"``;
``"all"``: every parameter of the group). GE adds ``N(0, sigma + 1e-8)`` to each modulated
tensor, sigma the standard deviation of its unmodulated gradient (``noise_std="tensor"``;
``"group"``: the modulated output's over the group, as before 0.4).

Two layouts of the objectives: ``M = 1``, the official step's single fused loss, each
group its own view (scores required, one per group); or ``[fused, view_1, ..., view_V]``
with ``group_objectives`` naming each group's view objective, which adds
``unimodal * g_v`` and lets the losses stand in for the scores. The combination runs per
tensor in the backend's fused kernels.

The noise is counter-based: the value at element i of parameter p on committed step t is
a function of ``(seed, t, p, i)`` alone (``ge_noise``). So a skipped step draws nothing
that a later step would miss: the sync-free step, which cannot know on the host whether
it commits, adds the same noise as the host-driven one, a resumed run adds the same noise
as an uninterrupted one from the step count alone, and a rank holding a slice of a
parameter computes just that slice.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import _validation as V
from ..collect import GRADS
from ..reference.moo import ogm_coefficients, ogm_coefficients_from_scores
from ._base import (Method, StepContext, StepResult, all_reduce_sum, check_losses, combine_segments, decide,
                    locate_nonfinite, weighted_diagnostics)

Tensor = torch.Tensor


def ogm_scores(logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """OGM-GE's per-view scores: for each view's ``B x C`` logits (its share of the fused
    head's output, as the official step splits it), ``sum_i softmax(logits)_i[labels_i]``.
    Detached, float64; pass them as ``cal.backward(losses, scores=...)``.

    >>> ogm_scores([torch.zeros(4, 2), torch.tensor([[9.0, 0.0]] * 4)], torch.zeros(4, dtype=torch.long))
    tensor([2.0000, 3.9995], dtype=torch.float64)
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise TypeError("labels must be a 1-D tensor of class indices")
    out = []
    for v, x in enumerate(logits):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != labels.shape[0]:
            raise ValueError(f"logits[{v}] must be B x C with B = {labels.shape[0]}; got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        p = torch.softmax(x.detach().to(torch.float64), dim=1)
        out.append(p.gather(1, labels.reshape(-1, 1).to(p.device)).sum())
    return torch.stack(out)


class OGM(Method):
    name = "ogm"
    defaults = {"alpha": 0.5, "unimodal": 0.0, "noise": True, "seed": 0, "group_objectives": None,
                "modulate": "conv", "noise_std": "tensor"}
    takes_scores = True

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        m, groups = layout.num_objectives, layout.num_groups
        if m == 1:  # the official step: one fused loss, each group its own view
            if options["group_objectives"] is not None:
                raise ValueError("group_objectives: with M = 1 each parameter group is its own view (scores per group)")
            if options["unimodal"]:
                raise ValueError("unimodal: with M = 1 there is no view objective to add")
            self.objectives: Optional[List[int]] = None
            self.view_of = list(range(groups))
        else:
            self.objectives = self._group_objectives(options["group_objectives"], groups, m)
            views = sorted(set(self.objectives))
            self.view_of = [views.index(v) for v in self.objectives]
        self.num_scores = max(self.view_of) + 1
        self._modulated = torch.tensor([options["modulate"] == "all" or p.dim() == 4 for p in layout.params])

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        V.check_positive("alpha", o["alpha"])
        if isinstance(o["unimodal"], bool) or not isinstance(o["unimodal"], (int, float)) or o["unimodal"] < 0:
            raise ValueError(f"unimodal must be a number >= 0; got {o['unimodal']!r}")
        if not isinstance(o["noise"], bool):
            raise TypeError(f"noise must be a bool; got {type(o['noise']).__name__}")
        if isinstance(o["seed"], bool) or not isinstance(o["seed"], int):
            raise TypeError(f"seed must be an int; got {type(o['seed']).__name__}")
        V.check_choice("modulate", o["modulate"], ("conv", "all"))
        V.check_choice("noise_std", o["noise_std"], ("tensor", "group"))

    @classmethod
    def saved_options(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        return {"modulate": "all", "noise_std": "group", **options}  # mmgrad before 0.4

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

    def _coefficients(self, ctx: StepContext):
        """Per view: k and rho, from the scores or, without them, the views' losses."""
        if ctx.scores is not None:
            return ogm_coefficients_from_scores(torch.nan_to_num(ctx.scores.to(torch.float64)), self.options["alpha"])
        if self.objectives is None:
            raise ValueError("scores: ogm with M = 1 needs the views' scores: "
                             "cal.backward([loss], scores=mmgrad.methods.ogm_scores(view_logits, labels))")
        views = sorted(set(self.objectives))
        return ogm_coefficients(torch.nan_to_num(ctx.loss_values.to(torch.float64))[views], self.options["alpha"])

    def step(self, ctx: StepContext) -> StepResult:
        lay, o = ctx.layout, self.options
        ok, failed = check_losses(ctx)
        if failed is not None:
            return failed
        if ctx.scores is not None:
            ok = ok & torch.isfinite(ctx.scores).all() & (ctx.scores > 0).all()
            if decide(ctx, ok) is False:
                return StepResult(False, lambda: f"the scores are not all finite and positive: {ctx.scores.tolist()}")
        k_view, rho_view = self._coefficients(ctx)
        device = k_view.device
        view = torch.tensor(self.view_of, device=device)
        k, rho = k_view[view], rho_view[view]  # per group
        group = torch.tensor(lay.group_of, device=device)
        modulated = self._modulated.to(device)
        alpha = torch.zeros(len(lay.params), lay.num_objectives, dtype=torch.float64, device=device)
        alpha[:, 0] = torch.where(modulated, k[group], torch.ones_like(k[group]))
        if self.objectives is not None:
            alpha[torch.arange(len(lay.params)), torch.tensor(self.objectives)[group.cpu()]] += float(o["unimodal"])
        sigma = self._unmodulated_std(ctx) if o["noise"] and o["noise_std"] == "tensor" else None
        nonfinite, _ = combine_segments(ctx, alpha, with_gram=False, by="tensor")
        ok = ok & (nonfinite == 0)
        if decide(ctx, ok) is False:
            return StepResult(False, lambda: locate_nonfinite(lay))
        diagnostics = {**weighted_diagnostics(alpha, None, lay.group_of), "ogm_coefficients": k, "ogm_ratio": rho}
        if o["noise"]:
            diagnostics["noise_std"] = self._add_noise(ctx, sigma)
        return StepResult(ok, diagnostics=diagnostics)

    def _unmodulated_std(self, ctx: StepContext) -> Tensor:
        """Per parameter: the (unbiased) standard deviation of its gradient before the
        modulation, ``g_fused + unimodal g_view``, over all its elements (all ranks)."""
        lay = self.layout
        sums = torch.zeros(len(lay.params), 3, dtype=torch.float64, device=lay.device)  # n, sum, sum of squares
        for i in range(len(lay.params)):
            if not bool(self._modulated[i]):
                continue
            seg, at = lay.locate(i)
            lo, hi = (int(x) for x in seg.tensor_offsets[at : at + 2])
            x = torch.zeros(hi - lo, dtype=torch.float64, device=lay.device)
            coefficients = {0: 1.0}
            if self.objectives is not None and self.options["unimodal"]:
                coefficients[self.objectives[lay.group_of[i]]] = float(self.options["unimodal"])
            for objective, c in coefficients.items():
                row = seg.row_of(objective)
                if row is not None:
                    x += c * seg.buffers[GRADS][row, lo:hi].to(torch.float64)
            sums[i, 0] = hi - lo
            sums[i, 1], sums[i, 2] = x.sum(), (x * x).sum()
        return _std_from_sums(ctx, sums)

    def _add_noise(self, ctx: StepContext, sigma: Optional[Tensor]) -> Tensor:
        """GE on the modulated tensors: ``N(0, sigma + 1e-8)`` per tensor (``noise_std="tensor"``,
        ``sigma`` from ``_unmodulated_std``), or ``N(0, sigma_g)`` with sigma_g the group
        output's (unbiased) standard deviation (``"group"``); each element's draw from ``ge_noise``."""
        lay = self.layout
        views = lay.out_views
        if sigma is None:
            sums = torch.zeros(lay.num_groups, 3, dtype=torch.float64, device=lay.device)  # n, sum, sum of squares
            for i, g in enumerate(lay.group_of):
                x = views[i].to(torch.float64)
                sums[g] += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=lay.device), x.sum(), (x * x).sum()])
            sigma = _std_from_sums(ctx, sums)
            scale = sigma[torch.tensor(lay.group_of, device=sigma.device)]
        else:
            scale = sigma + 1e-8  # the official N(0, std + 1e-8)
        step = ctx.steps + 1  # the step being taken: a skipped one leaves it to the next
        for i in range(len(lay.params)):
            if not bool(self._modulated[i]):
                continue
            # the flat index of this rank's first element: its first row of dim 0 times a row's size
            first = 0 if lay.shards is None else lay.shards[i][0] * math.prod(lay.params[i].shape[1:])
            noise = ge_noise(self.options["seed"], step, i, first, views[i].numel(), lay.device)
            views[i].add_((noise * scale[i].to(torch.float32)).to(views[i].dtype).reshape(views[i].shape))
        return sigma

    # No state: the noise is a function of (seed, step count), and the checkpoint has the
    # step count. Checkpoints of earlier versions carry a "generator" state, ignored.


def _std_from_sums(ctx: StepContext, sums: Tensor) -> Tensor:
    """Unbiased standard deviations from per-part ``[n, sum, sum of squares]`` rows,
    summed over the ranks first (each holds a slice of the elements)."""
    n, s1, s2 = all_reduce_sum(ctx, [sums])[0].unbind(1)
    return torch.sqrt(torch.clamp_min((s2 - s1 * s1 / n.clamp_min(1.0)) / torch.clamp_min(n - 1, 1.0), 0.0))


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
