"""``Weighting``: the public base of the Gramian methods (MGDA, MMPareto, and any added).

The Gram matrices come from every segment's rows (a segment adds its ``|R| x |R|`` block
to its groups' ``M x M``; an objective that reaches no segment of a group keeps a zero
row, and so weight 0, as in the dense layout). ``lagged=True`` combines with the
previous step's weights and takes the next Gram from the same read.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from ._base import (Method, StepContext, StepResult, combine_segments, decide, locate_nonfinite, per_group_gram,
                    weighted_diagnostics)

Tensor = torch.Tensor


class Weighting(Method):
    """A Gramian weighting: each parameter group's ``M x M`` Gram matrix of the
    per-objective gradients in, the group's ``M`` weights out; the group's calibrated
    gradient is then ``sum_m w_m g_m`` (docs/spec.md §4), in one fused combination.

    A subclass gives ``name``, its option ``defaults`` and ``check_options``, and
    ``weights(grams, losses)``: ``G x M x M`` float64 Gram matrices (and the M loss
    values, float64, on the same device) to ``G x M`` float64 weights. Every weighting
    takes ``lagged`` (default False): combine with the previous step's weights and
    compute the next Gram in the same read of the rows. ``mmgrad.methods.register``
    makes ``FusedCalibrator(method=name)`` find it; it then runs on every backend, the
    Gram and the combination in the backend's kernels. A weighting whose ``weights``
    never reads a value on the host may declare ``sync_free = True``; MGDA and MMPareto
    override ``solve`` with the backend's own solver (on the device for triton/cuda).

    >>> import torch, mmgrad
    >>> class InverseNorm(mmgrad.methods.Weighting):
    ...     name = "inverse-norm-doctest"
    ...     def weights(self, grams, losses):
    ...         inv = 1 / torch.diagonal(grams, dim1=1, dim2=2).sqrt().clamp_min(1e-12)
    ...         return inv / inv.sum(dim=1, keepdim=True)
    >>> _ = mmgrad.methods.register(InverseNorm)
    >>> lin = torch.nn.Linear(3, 1)
    >>> cal = mmgrad.FusedCalibrator(lin.parameters(), 2, method="inverse-norm-doctest")
    >>> x = torch.randn(8, 3)
    >>> cal.backward([lin(x).pow(2).mean(), 10 * lin(x).mean()])
    >>> cal.diagnostics["group_weights"].shape
    torch.Size([1, 2])
    """

    defaults: ClassVar[Dict[str, Any]] = {"lagged": False}
    family: ClassVar[str] = "gramian"
    kernels: ClassVar[Tuple[str, ...]] = ("gram", "combine_and_gram")
    #: whether ``weights`` (or ``solve``) runs without reading a value on the host
    sync_free: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = getattr(super(cls, cls), "defaults", {})  # a parent's, already merged
        cls.defaults = {"lagged": False, **inherited, **cls.__dict__.get("defaults", {})}

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``G x M`` float64 weights from ``G x M x M`` float64 Gram matrices and the M losses."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, options: Dict[str, Any]) -> None:
        if not isinstance(options["lagged"], bool):
            raise TypeError(f"lagged must be a bool; got {type(options['lagged']).__name__}")

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        self.prev_alpha: Optional[Tensor] = None

    def solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        """The step's weights: ``weights`` on the Gram matrices' device."""
        losses = ctx.loss_values
        losses = torch.zeros(grams.shape[1], dtype=torch.float64) if losses is None else losses
        w = self.weights(grams, losses.to(device=grams.device, dtype=torch.float64))
        if not isinstance(w, Tensor) or tuple(w.shape) != tuple(grams.shape[:2]):
            raise ValueError(f"{type(self).__name__}.weights must return G x M = {tuple(grams.shape[:2])} weights; got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        return w.to(torch.float64)

    @property
    def scope(self) -> str:
        """Where the weights apply: ``"group"`` (one M-vector per parameter group, from the
        group's Gram), or ``"tensor"`` (one per parameter, from the group's Gram and the
        parameter's own: ``solve_tensors``)."""
        return "group"

    @property
    def weights_shape(self) -> tuple:
        """``(parts, M)``: the shape of one step's weights (parts: groups or parameters)."""
        return (self.layout.num_parts(self.scope), self.layout.num_objectives)

    def solve_tensors(self, ctx: StepContext, group_grams: Tensor, tensor_grams: Tensor) -> Tensor:  # pragma: no cover
        """``P x M`` per-parameter weights (``scope == "tensor"``)."""
        raise NotImplementedError

    def _solve(self, ctx: StepContext, grams: Tensor) -> Tensor:
        """The weights of the scope's parts from their Gram matrices (NaN/inf zeroed in
        the sync-free mode: the step's flag has already counted them)."""
        grams = torch.nan_to_num(grams) if ctx.sync_free else grams
        if self.scope == "group":
            return self.solve(ctx, grams)
        lay = ctx.layout
        group_of = torch.tensor(lay.group_of, device=grams.device)
        group_grams = torch.zeros(lay.num_groups, *grams.shape[1:], dtype=grams.dtype, device=grams.device)
        return self.solve_tensors(ctx, group_grams.index_add_(0, group_of, grams), grams)

    def step(self, ctx: StepContext) -> StepResult:
        lay, lagged, by = ctx.layout, self.options["lagged"], self.scope
        ok = torch.ones((), dtype=torch.bool, device=lay.device)
        grams = None
        if lagged and self.prev_alpha is not None:
            alpha = self.prev_alpha  # one read: combine with last step's weights, Gram for the next
        else:
            grams = per_group_gram(ctx, by)
            ok = torch.isfinite(grams).all()  # K_mm = sum g^2 is inf/NaN iff row m is
            if decide(ctx, ok) is False:
                return StepResult(False, lambda: locate_nonfinite(lay))
            alpha = self._solve(ctx, grams)
        nonfinite, next_grams = combine_segments(ctx, alpha, with_gram=lagged, by=by)
        ok = ok & (nonfinite == 0) & torch.isfinite(alpha).all()
        if decide(ctx, ok) is False:
            return StepResult(False, lambda: locate_nonfinite(lay))
        if lagged:
            grams = next_grams
            fresh = self._solve(ctx, grams)
            self.prev_alpha = fresh if self.prev_alpha is None or not ctx.sync_free else torch.where(ok, fresh, self.prev_alpha)
        return StepResult(ok, diagnostics=weighted_diagnostics(alpha, grams, lay.group_of if by == "tensor" else None))

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.prev_alpha is None else {"prev_alpha": self.prev_alpha.clone()}

    def check_state(self, state: Dict[str, Any], segments) -> None:
        prev = state.get("prev_alpha")
        want = self.weights_shape
        if prev is not None and (not isinstance(prev, Tensor) or tuple(prev.shape) != want):
            raise ValueError(f"state prev_alpha must be the {'G' if self.scope == 'group' else 'P'} x M = {want} lagged "
                             "weights; got "
                             f"{tuple(prev.shape) if isinstance(prev, Tensor) else type(prev).__name__}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        prev = state.get("prev_alpha")
        self.prev_alpha = None if prev is None else prev.clone().to(self.layout.device)
