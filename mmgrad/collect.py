"""Per-objective gradients into the layout's rows: reach, backward passes, accumulation.

``graph_reach`` reads, from the losses' autograd graphs, which objectives reach which
parameters (docs/spec.md §2: from the graph, never from zero values). ``GradientCollector``
then fills each segment's ``grads`` rows, by one ``backward`` per objective
(``"loop"``: autograd adds straight into views of the rows, no copy) or by one vmapped
``autograd.grad`` (``"batched"``), adding to what earlier micro-batches left there when
accumulating (docs/spec.md §7).

>>> import torch
>>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
>>> x = torch.randn(4, 2)
>>> la, lb = a(x).sum(), (a(x) + b(x)).sum()
>>> reach, others = graph_reach([la, lb], [*a.parameters(), *b.parameters()])
>>> reach   # a.weight, a.bias: both losses; b.weight, b.bias: the second only
[{0, 1}, {0, 1}, {1}, {1}]
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from .layout import Layout

Tensor = torch.Tensor
BACKWARD_MODES = ("loop", "batched")
GRADS = "grads"  # the layout buffer holding the per-objective gradients

# Phrases of the errors DDP's reducer raises when a second backward reaches it.
_DDP_ERRORS = ("DistributedDataParallel", "DDP", "mark a variable ready", "finished reduction")


def graph_reach(roots: Sequence[Tensor], params: Sequence[Tensor], num_objectives: Optional[int] = None
                ) -> Tuple[List[Set[int]], List[Tensor]]:
    """Which objectives reach each parameter, and the other leaves the roots reach.

    Root r is objective ``r % num_objectives`` (several micro-batches of M losses for the
    sample estimator). A walk over each root's graph to its ``AccumulateGrad`` nodes: a
    few hundred Python steps for a typical model, whatever the parameter count.
    """
    m = len(roots) if num_objectives is None else num_objectives
    index = {id(p): i for i, p in enumerate(params)}
    reach: List[Set[int]] = [set() for _ in params]
    others: Dict[int, Tensor] = {}
    for r, root in enumerate(roots):
        objective, stack, seen = r % m, [root.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None:
                i = index.get(id(var))
                if i is None:
                    others[id(var)] = var
                else:
                    reach[i].add(objective)
            stack.extend(nf for nf, _ in fn.next_functions)
    return reach, list(others.values())


def add_to_rows(layout: Layout, objective: int, sample: int, grads: Dict[int, Tensor]) -> None:
    """Add ``grads[i]`` (parameter i's gradient of ``objective``, shaped as the layout holds
    parameter i) into micro-batch ``sample``'s row of it, growing the reach first where the
    layout has no such row, so no gradient is dropped."""
    layout.extend([{objective} if i in grads else () for i in range(len(layout.params))])
    for i, g in grads.items():
        seg, k = layout.locate(i)
        seg.param_views(GRADS, sample * len(seg.rows) + seg.row_of(objective))[k].add_(g)


class GradientCollector:
    """Fills the layout's ``grads`` rows from M (or S x M) losses; see the module docstring.

    Sharded (docs/spec.md §8), the rows hold this rank's slice only: with a ``sharder``
    (``mmgrad.sharding.RowSharder``) each objective's full gradients are reduce-scattered
    into them; with ``fsdp`` (``mmgrad.fsdp.FSDPGradients``) FSDP2's sharded gradients
    are moved in. Either way autograd writes ``.grad``, not views of the rows.
    """

    def __init__(self, layout: Layout, mode: str, averager: Any = None, sharder: Any = None, fsdp: Any = None) -> None:
        self.layout = layout
        self.mode = mode
        self.averager = averager
        self.sharder = sharder
        self.fsdp = fsdp

    def ensure_buffer(self, samples: int) -> None:
        """``grads``: ``|R| x N_s`` per segment, or ``S x |R| x N_s`` for the sample estimator."""
        self.layout.add_buffer(GRADS, self.layout.dtype, (samples,) if samples > 1 else ())

    def collect(self, rows: List[Tensor], samples: int, accumulate: bool, others: List[Tensor], reduce: bool) -> None:
        """Run the backward passes of ``rows`` (S x M losses, flattened); ``accumulate``
        adds to the rows' current contents; ``reduce`` launches the rows' averaging."""
        lay = self.layout
        if self.sharder is not None:
            self.sharder.wait()  # an earlier call's last objective lands before these are added
        if not accumulate:
            lay.zero_(GRADS)
        if self.mode == "batched":
            self._batched(rows, samples, accumulate, others)
        else:
            self._loop(rows, reduce)
        if reduce and self.averager is not None and self.mode == "batched" and self.sharder is None:
            for t in lay.buffers(GRADS):
                self.averager.launch(t.view(-1))

    # ------------------------------------------------------------------ loop
    def _loop(self, rows: List[Tensor], reduce: bool) -> None:
        lay, m = self.layout, self.layout.num_objectives
        last = len(rows) - 1
        sharded = self.sharder is not None or self.fsdp is not None
        for r, loss in enumerate(rows):
            objective, sample = r % m, r // m
            if sharded:
                for p in lay.params:
                    p.grad = None
            else:
                targets = self._point_grads_at_rows(objective, sample)
            if self.fsdp is not None:
                self.fsdp.active = objective
            try:
                loss.backward(retain_graph=r < last)
            except RuntimeError as err:
                self._drain()  # every rank fails here alike: finish what was launched, or its threads abort at exit
                if r > 0 and any(k in str(err) for k in _DDP_ERRORS):
                    raise RuntimeError(
                        "a second backward through a DistributedDataParallel model failed: DDP reduces once per "
                        "forward. Run the forward and cal.backward(losses) under `with ddp_model.no_sync():` and let "
                        "the calibrator average the gradients (docs/guide.md, \"Distributed training\")") from err
                raise
            finally:
                if self.fsdp is not None:
                    self.fsdp.active = None
            if self.fsdp is not None:
                self.fsdp.take(lay, objective, sample)
                continue
            if self.sharder is not None:  # overlap this objective's reduce-scatter with the next backward
                self._scatter(objective, sample, [p.grad for p in lay.params])
                for p in lay.params:
                    p.grad = None
                self.sharder.wait(keep_last=True)
                continue
            self._keep_stray_gradients(objective, sample, targets)
            if reduce and self.averager is not None:  # this objective's rows are final: overlap their reduction
                for seg in lay.reached:
                    j = seg.row_of(objective)
                    if j is not None:
                        self.averager.launch(seg.rows_view(GRADS)[sample, j])
        for p in lay.params:
            p.grad = None  # nothing stale is visible until the calibrated gradient is written

    def _drain(self) -> None:
        if self.averager is not None:
            self.averager.wait()
        if self.sharder is not None:
            self.sharder.wait()

    def _scatter(self, objective: int, sample: int, grads: List[Optional[Tensor]]) -> None:
        """Hand objective ``objective``'s full gradients to the sharder. The reach is the same
        on every rank (the facade took its union), so are the collectives; a gradient where
        the walk saw no path exists on this rank only, and cannot join them."""
        reach = self.layout.reach
        stray = [i for i, g in enumerate(grads) if g is not None and objective not in reach[i]]
        if stray:
            self._drain()
            raise RuntimeError(f"objective {objective} wrote a gradient into {self.layout.label(stray[0])} that "
                               "its autograd graph does not lead to (a custom hook or autograd.Function?); with "
                               "shard=True every rank must reduce-scatter the same rows, so it cannot be kept")
        self.sharder.scatter(self.layout, objective, sample,
                             [g if g is None or g.layout == torch.strided else g.to_dense() for g in grads])

    def _point_grads_at_rows(self, objective: int, sample: int) -> List[bool]:
        """``p.grad`` := the view of p's row of ``objective`` (autograd adds into it in
        place), or None where the objective does not reach p; returns which got a view."""
        for seg in self.layout.segments:
            j = seg.row_of(objective)
            views = seg.param_views(GRADS, sample * len(seg.rows) + j) if j is not None else None
            for k, p in enumerate(seg.params):
                p.grad = views[k] if views is not None else None
        return [p.grad is not None for p in self.layout.params]

    def _keep_stray_gradients(self, objective: int, sample: int, targets: List[bool]) -> None:
        """A gradient autograd wrote where the graph walk saw no path (a custom hook or
        function): grow the layout to hold it rather than drop it."""
        lay = self.layout
        stray = [(i, p.grad) for i, (p, t) in enumerate(zip(lay.params, targets)) if not t and p.grad is not None]
        if not stray:
            return
        for i, _ in stray:
            lay.params[i].grad = None
        add_to_rows(lay, objective, sample, {i: g.to_dense() if g.layout != torch.strided else g for i, g in stray})

    # --------------------------------------------------------------- batched
    def _batched(self, rows: List[Tensor], samples: int, accumulate: bool, others: List[Tensor]) -> None:
        lay, m = self.layout, self.layout.num_objectives
        stacked = torch.stack([r.reshape(()) for r in rows])
        eye = torch.eye(len(rows), device=stacked.device, dtype=stacked.dtype)
        try:
            grads = torch.autograd.grad(stacked, lay.params, grad_outputs=eye, is_grads_batched=True,
                                        allow_unused=True, retain_graph=bool(others))
        except NotImplementedError as err:
            if "Sparse" not in str(err):
                raise
            raise TypeError("backward_mode='batched' cannot produce sparse gradients (nn.Embedding(sparse=True)): "
                            "use backward_mode='loop', which densifies them into the buffer") from err
        if self.sharder is not None:
            reach = lay.reach  # a vmapped grad has a (zero) row for every objective; send the reached ones
            for r in range(len(rows)):
                self._scatter(r % m, r // m, [None if g is None or r % m not in reach[i] else g[r]
                                              for i, g in enumerate(grads)])
            if others:
                stacked.sum().backward(inputs=others)
            return
        for seg in lay.reached:
            buf = seg.buffers[GRADS].view(samples, len(seg.rows), seg.numel)
            rows_idx = torch.tensor(seg.rows, device=buf.device)
            at = 0
            for i in seg.index:
                g, n = grads[i], lay.numels[i]
                if g is not None:
                    part = g.reshape(samples, m, -1).index_select(1, rows_idx)
                    dst = buf[:, :, at : at + n]
                    dst.add_(part) if accumulate else dst.copy_(part)
                at += n
        if others:  # parameters outside the calibrator still get the summed gradient
            stacked.sum().backward(inputs=others)
