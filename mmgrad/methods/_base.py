"""What every calibration method shares: its context, its result and the per-segment passes.

A method is a class with a ``name``, its option ``defaults``, a ``check_options`` and a
``step(ctx) -> StepResult`` on the layout; its line in ``mmgrad.methods.METHODS`` makes
``FusedCalibrator(method=name)`` find it. ``step`` must leave every state it holds
untouched when the gradients are not finite (docs/spec.md §7): in the host mode it returns
``StepResult(False, ...)`` before writing any; in the sync-free mode ``ok`` is a device
flag and every state write is gated by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..collect import GRADS
from ..layout import Layout
from ..ops import implements

Tensor = torch.Tensor
Flag = Union[bool, Tensor]  # a host bool, or a 0-dim device bool in the sync-free mode


@dataclass
class StepContext:
    """What a method's step reads: the layout (rows and output), the backend's functions,
    the M loss values (summed over accumulated calls), the committed step count
    (an int, or a 0-dim device tensor when ``sync_free``), and, when each rank holds a
    slice of the rows (docs/spec.md §8), the group whose sums make the global statistics."""

    layout: Layout
    ops: ModuleType
    loss_values: Optional[Tensor]
    steps: Union[int, Tensor]
    sync_free: bool
    group: Any = None
    #: per-view scores from ``backward(..., scores=)`` (float64), summed like the losses; or None
    scores: Optional[Tensor] = None


@dataclass
class StepResult:
    """``ok``: the step was finite (and committed). ``where``: says, when not, which input
    was not finite. ``diagnostics``: what ``FusedCalibrator.diagnostics`` shows."""

    ok: Flag
    where: Callable[[], str] = lambda: ""
    diagnostics: Dict[str, Tensor] = field(default_factory=dict)


class Method:
    """Base of the calibration methods; see the module docstring."""

    name: ClassVar[str] = ""
    defaults: ClassVar[Dict[str, Any]] = {}
    #: False for methods that take autograd's plain sum and need no per-objective rows
    uses_rows: ClassVar[bool] = True
    #: True when ``backward`` takes S >= 2 micro-batches of M losses (BOGC's sample estimator)
    takes_samples: bool = False
    #: True when ``backward(..., scores=)`` takes ``num_scores`` per-view scores (OGM-GE)
    takes_scores: ClassVar[bool] = False
    num_scores: int = 0
    #: the layout buffers holding per-row state that checkpoints carry (BOGC's EMA)
    row_state: Tuple[str, ...] = ()
    #: whether the step runs with ``sync_free=True`` (no value read on the host)
    sync_free: ClassVar[bool] = True
    #: the fused pass the step is, which the benchmarks and the traffic model read: "bogc"
    #: (rows and EMA state read once), "gramian" (the Gram, the weights, the combination:
    #: rows read twice), "weighted" (weights from the losses, one combination), "sum"
    #: (autograd's sum; no rows)
    family: ClassVar[str] = "weighted"
    #: the backend functions (``mmgrad.ops`` names) the step calls
    kernels: ClassVar[Tuple[str, ...]] = ("combine_and_gram",)

    def __init__(self, options: Dict[str, Any], layout: Layout) -> None:
        self.options = options
        self.layout = layout

    @classmethod
    def check_options(cls, options: Dict[str, Any]) -> None:
        """Raise ValueError/TypeError naming the option that is wrong."""

    @classmethod
    def saved_options(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        """A checkpoint's options, with those its mmgrad did not write yet filled in as
        they behaved then (so a changed default is noticed when it loads)."""
        return dict(options)

    @classmethod
    def unsupported(cls, backend: ModuleType, num_objectives: int) -> Optional[str]:
        """Why ``backend`` (an ``mmgrad.ops.backend_module``) cannot run this method with M
        objectives, or None: by default, a function of ``kernels`` it has no kernel for."""
        missing = [k for k in cls.kernels if not implements(backend, k)]
        return f"it has no kernel for {', '.join(missing)}" if missing else None

    @classmethod
    def sync_free_refusal(cls, options: Dict[str, Any], num_objectives: int) -> Optional[str]:
        """Why the method cannot run with ``sync_free=True`` with these options and M
        objectives, or None."""
        return None if cls.sync_free else "declares no solve that stays on the device (its class says sync_free = False)"

    def step(self, ctx: StepContext) -> StepResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def check_state(self, state: Dict[str, Any], segments: List[Tuple[int, int]]) -> None:
        """Raise ValueError, naming the key, where ``state`` does not fit this method with
        reached segments of ``segments`` (rows, elements); change nothing."""

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (checked by ``check_state``; the layout is
        already the saved one)."""

    def state_bytes(self) -> int:
        return 0


def all_reduce_sum(ctx: StepContext, tensors: Sequence[Tensor]) -> List[Tensor]:
    """Sharded (docs/spec.md §8): each tensor summed over the ranks, all in one all-reduce (float64;
    counts stay exact below 2**53). Unsharded: the tensors as they are."""
    if ctx.group is None:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, group=ctx.group)
    return [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_ranks_ok(ctx: StepContext, ok: Tensor) -> Tensor:
    """A local finiteness flag made global, so every rank takes the same decision."""
    if ctx.group is None:
        return ok
    return all_reduce_sum(ctx, [(~ok).to(torch.float64)])[0] == 0


def decide(ctx: StepContext, ok: Tensor) -> Flag:
    """The host mode reads the flag (a synchronisation); the sync-free mode keeps it on the device."""
    return ok if ctx.sync_free else bool(ok)


def check_losses(ctx: StepContext) -> Tuple[Tensor, Optional[StepResult]]:
    """Whether the loss values the weights are made of are finite: the flag, and in the
    host mode the failed result naming the first bad objective (else None)."""
    losses = ctx.loss_values
    ok = torch.isfinite(losses).all()
    if decide(ctx, ok) is False:
        bad = int((~torch.isfinite(losses)).nonzero()[0, 0])
        return ok, StepResult(False, lambda: f"the loss of objective {bad} (losses[{bad}]) is not finite")
    return ok, None


def locate_nonfinite(layout: Layout) -> str:
    """Names the first objective and parameter whose gradient is not finite."""
    for seg in layout.reached:
        g = seg.rows_view(GRADS)
        bad = (~torch.isfinite(g)).nonzero()
        if bad.numel():
            _, row, d = bad[0].tolist()
            objective, at = seg.rows[row], 0
            for i in seg.index:
                if at + layout.numels[i] > d:
                    return (f"the gradient of objective {objective} (losses[{objective}]) for "
                            f"{layout.label(i)} is not finite")
                at += layout.numels[i]
    if layout.shards is not None:
        return "a per-objective gradient is not finite (in the slice another rank holds)"
    return "a per-objective gradient is not finite"


def _zero_grams(lay: Layout, by: str) -> Tensor:
    m = lay.num_objectives
    return torch.zeros(lay.num_parts(by), m, m, dtype=torch.float64, device=lay.device)


def per_group_gram(ctx: StepContext, by: str = "group") -> Tensor:
    """The ``G x M x M`` Gram matrices (float64) from every segment's rows, one read
    (summed over the ranks when they are sharded); ``by="tensor"``: one per parameter,
    ``P x M x M``, from the same read (a group's is the sum of its tensors')."""
    lay = ctx.layout
    grams = _zero_grams(lay, by)
    for seg in lay.reached:
        if seg.numel:
            lay.scatter_gram(seg, ctx.ops.gram(seg.buffers[GRADS], group_offsets=seg.parts(by)[1]), grams, by)
    return all_reduce_sum(ctx, [grams])[0]


def combine_segments(ctx: StepContext, alpha: Tensor, with_gram: bool,
                     by: str = "group") -> Tuple[Tensor, Optional[Tensor]]:
    """``out = sum_m alpha[group, m] g_m`` over every segment (zeros where nothing reaches);
    returns the count of non-finite gradient entries and, ``with_gram``, the Gram
    matrices from the same read (the lagged mode), both summed over sharded ranks.
    ``by="tensor"``: ``alpha`` and the Gram matrices are per parameter (``P x M``)."""
    lay = ctx.layout
    nonfinite = torch.zeros((), dtype=torch.int64, device=lay.device)
    grams = _zero_grams(lay, by) if with_gram else None
    alpha = alpha.to(lay.device)
    for seg in lay.segments:
        out = lay.out[seg.lo : seg.hi]
        if not seg.rows or not seg.numel:
            out.zero_()
            continue
        rows = torch.tensor(seg.rows, device=lay.device)
        parts, offsets = seg.parts(by)
        a = alpha[torch.tensor(parts, device=lay.device)].index_select(1, rows)
        _, st = ctx.ops.combine_and_gram(seg.buffers[GRADS], a, group_offsets=offsets, out=out, with_gram=with_gram)
        nonfinite = nonfinite + st["nonfinite"].to(lay.device)
        if with_gram:
            lay.scatter_gram(seg, st["gram"], grams, by)
    if with_gram:
        nonfinite, grams = all_reduce_sum(ctx, [nonfinite, grams])
    else:
        nonfinite = all_reduce_sum(ctx, [nonfinite])[0]
    return nonfinite, grams


def weighted_diagnostics(alpha: Tensor, grams: Optional[Tensor], group_of: Optional[List[int]] = None) -> Dict[str, Tensor]:
    """What ``FusedCalibrator.diagnostics`` shows of a weighted step; with ``group_of``,
    ``alpha`` and ``grams`` are per parameter (``tensor_weights``, and the groups' Gram
    matrices summed from them)."""
    share = alpha / alpha.sum(dim=1, keepdim=True).clamp_min(1e-300)
    diag = {"weights": share.mean(dim=0), "group_weights" if group_of is None else "tensor_weights": alpha}
    if grams is not None and group_of is not None:
        index = torch.tensor(group_of, device=grams.device)
        grams = torch.zeros(max(group_of) + 1, *grams.shape[1:], dtype=grams.dtype, device=grams.device).index_add_(0, index, grams)
    if grams is not None:
        diag["gram"] = grams
    return diag
