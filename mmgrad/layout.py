"""Where the calibrator keeps its rows: parameters grouped into segments by reach (docs/spec.md §2).

Objective m *reaches* a parameter when the autograd graph of loss m leads to it. A
*segment* holds the parameters that share one reach set R (possibly from several
parameter groups); it stores only its ``|R| x N_s`` rows, so a view's own loss costs
memory only over its encoder, never over the whole model. Row buffers (the
per-objective gradients, BOGC's EMA moments) live per segment under a name; the
calibrated output is one flat vector whose per-parameter views become ``.grad``.

The reach a layout uses is the union of every reach seen so far: it only grows. A row
that stops being reached keeps its state (its gradient is zero, as it would be in the
dense ``M x N`` layout), so the result never depends on when the layout changed, and
growing the layout carries every row over (``Layout.extend``).

>>> import torch
>>> enc_a, enc_b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)
>>> layout = Layout([[*enc_a.parameters()], [*enc_b.parameters()]], num_objectives=3)
>>> layout.extend([{0, 1}, {0, 1}, {0, 2}, {0, 2}])   # fused reaches all, each view its own
True
>>> [(seg.rows, seg.numel) for seg in layout.segments]
[((0, 1), 8), ((0, 2), 10)]
>>> layout.rows_held(), layout.num_objectives * layout.num_elements   # stored vs dense rows
(36, 54)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .params import label

Tensor = torch.Tensor
Reach = Tuple[int, ...]


@dataclass
class BufferSpec:
    """A per-row buffer every segment holds: ``(*lead, |R|, N_s)`` of ``dtype``."""

    lead: Tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Segment:
    """Parameters reached by the same objectives ``rows``, laid out back to back.

    ``group_offsets`` are local (int64, on the CPU), one range per parameter group the
    segment draws from, ``groups`` naming those groups; ``lo:hi`` is the segment's slice
    of the flat output.
    """

    rows: Reach
    index: List[int]
    params: List[Tensor]
    shapes: List[torch.Size]
    groups: List[int]
    group_offsets: Tensor
    lo: int
    hi: int
    buffers: Dict[str, Tensor] = field(default_factory=dict)
    _views: Dict[Tuple[str, int], List[Tensor]] = field(default_factory=dict, repr=False)

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    @property
    def tensor_offsets(self) -> Tensor:
        """Local offsets of each parameter's range (int64, on the CPU): the segment cut per
        tensor, as ``group_offsets`` cuts it per group."""
        offsets = [0]
        for shape in self.shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        return torch.tensor(offsets, dtype=torch.int64)

    def parts(self, by: str) -> Tuple[List[int], Tensor]:
        """The segment cut ``by`` "group" or "tensor": the parts' global indices (groups,
        or parameters) and their local offsets."""
        return (self.groups, self.group_offsets) if by == "group" else (self.index, self.tensor_offsets)

    def row_of(self, objective: int) -> Optional[int]:
        """Position of ``objective`` among the segment's rows, or None when it does not reach."""
        try:
            return self.rows.index(objective)
        except ValueError:
            return None

    def rows_view(self, name: str) -> Tensor:
        """Buffer ``name`` as ``(S, |R|, N_s)`` (S = 1 without leading dimensions); a view,
        also when a sharded rank holds no element of the segment."""
        buf = self.buffers[name]
        return buf.unsqueeze(0) if buf.dim() == 2 else buf

    def param_views(self, name: str, flat_row: int) -> List[Tensor]:
        """Views shaped like the parameters into row ``flat_row`` of buffer ``name``
        (rows counted over the leading dimensions too); cached."""
        key = (name, flat_row)
        if key not in self._views:
            row = self.buffers[name].flatten(0, -2)[flat_row]
            self._views[key] = split_views(row, self.shapes)
        return self._views[key]


def split_views(flat: Tensor, shapes: Sequence[torch.Size]) -> List[Tensor]:
    """Consecutive views of a 1-D tensor, one of each shape."""
    views, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[at : at + n].view(shape))
        at += n
    return views


def dim0_rows(shape: Sequence[int], rank: int, world: int) -> Tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 that ``rank`` holds of a tensor of ``shape``
    split over ``world`` ranks as FSDP2 splits it (chunks of ``ceil(d0 / world)`` rows,
    the last ones shorter or empty; a 0-dim tensor is one row).

    >>> [dim0_rows((7, 3), rank, 4) for rank in range(4)]
    [(0, 2), (2, 4), (4, 6), (6, 7)]
    >>> [dim0_rows((3,), rank, 4) for rank in range(4)]   # the last rank holds nothing
    [(0, 1), (1, 2), (2, 3), (3, 3)]
    """
    d0 = shape[0] if len(shape) else 1
    chunk = -(-d0 // world)
    return min(rank * chunk, d0), min((rank + 1) * chunk, d0)


def shard_shape(shape: Sequence[int], rows: Tuple[int, int]) -> torch.Size:
    """The shape of the rows ``[start, stop)`` of a tensor of ``shape``."""
    return torch.Size((rows[1] - rows[0], *shape[1:]))


class Layout:
    """Segments of the calibrated parameters by reach, their row buffers and the output.

    Args:
        groups: the calibrator's parameter groups (lists of leaf tensors).
        num_objectives: M.
        shards: for a sharded calibrator (docs/spec.md §8), the rows ``[start, stop)`` of each
            parameter's dim 0 this rank holds; the layout then holds only those
            (``num_elements`` counts them, ``total_elements`` the whole parameters).
        names: the parameters' names (None where unknown), for ``label``.
        output: whether the calibrated output (and its views, which become ``.grad``)
            is held; a method that leaves autograd's sum in ``.grad`` needs none.
    """

    def __init__(self, groups: Sequence[Sequence[Tensor]], num_objectives: int,
                 shards: Optional[Sequence[Tuple[int, int]]] = None,
                 names: Optional[Sequence[Optional[str]]] = None, output: bool = True) -> None:
        self.num_objectives = num_objectives
        self.params: List[Tensor] = [p for grp in groups for p in grp]
        self.names: List[Optional[str]] = list(names) if names is not None else [None] * len(self.params)
        self.group_of: List[int] = [gi for gi, grp in enumerate(groups) for _ in grp]
        self.num_groups = len(groups)
        self.shards = None if shards is None else [tuple(r) for r in shards]
        self.shapes: List[torch.Size] = ([p.shape for p in self.params] if self.shards is None else
                                         [shard_shape(p.shape, r) for p, r in zip(self.params, self.shards)])
        self.numels: List[int] = [math.prod(s) for s in self.shapes]
        self.num_elements = sum(self.numels)
        self.total_elements = sum(p.numel() for p in self.params)
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        self.reach: List[Reach] = [() for _ in self.params]
        self._specs: Dict[str, BufferSpec] = {}
        self.out = torch.zeros(self.num_elements if output else 0, device=self.device, dtype=self.dtype)
        self._output = output
        self._raw: Optional[Tensor] = None
        self.segments: List[Segment] = []
        self._build()

    @property
    def raw(self) -> Tensor:
        """The unrounded output, float32 for half-precision parameters (norm matching then
        rounds once), else ``out`` itself; allocated when first asked for (BOGC)."""
        if self._raw is None:
            self._raw = self.out if self.dtype in (torch.float32, torch.float64) else torch.zeros(
                self.num_elements, device=self.device, dtype=torch.float32)
        return self._raw

    def output_bytes(self) -> int:
        """Bytes of the output and, where it is held apart, the unrounded output."""
        size = self.out.numel() * self.out.element_size()
        if self._raw is not None and self._raw is not self.out:
            size += self._raw.numel() * self._raw.element_size()
        return size

    def label(self, i: int) -> str:
        """How errors name parameter ``i``: ``'enc.weight' (shape (4, 3))``, or by index."""
        return label(self.params[i], self.names[i], i)

    def __repr__(self) -> str:
        held = self.rows_held()
        return (f"Layout({len(self.params)} parameters in {self.num_groups} groups, {self.num_elements} elements, "
                f"M={self.num_objectives}; segments by reach: "
                f"{[(seg.rows, seg.numel) for seg in self.segments]}; "
                f"{held} of {self.num_objectives * self.num_elements} dense rows' elements held, "
                f"{self.nbytes()} bytes)")

    def nbytes(self) -> int:
        """Bytes of every row buffer and the output."""
        total = self.output_bytes()
        for seg in self.segments:
            total += sum(t.numel() * t.element_size() for t in seg.buffers.values())
        return total

    # ------------------------------------------------------------------ reach
    def extend(self, reach: Sequence[Iterable[int]]) -> bool:
        """Add ``reach[i]`` (objectives reaching parameter i) to the layout's reach; re-lay
        out, carrying every buffer row over, when that adds a row. Returns whether it did."""
        grown = [tuple(sorted(set(old) | set(new))) for old, new in zip(self.reach, reach)]
        if grown == self.reach:
            return False
        self.set_reach(grown)
        return True

    def set_reach(self, reach: Sequence[Reach]) -> None:
        """Lay out for exactly ``reach`` (a checkpoint's), carrying the rows both layouts hold."""
        old_segments, old_reach = self.segments, self.reach
        self.reach = [tuple(r) for r in reach]
        self._build()
        where = {}  # parameter -> (old segment, offset inside it)
        for seg in old_segments:
            at = 0
            for i in seg.index:
                where[i] = (seg, at)
                at += self.numels[i]
        for seg in self.segments:
            at = 0
            for i in seg.index:
                old, old_at = where.get(i, (None, 0))
                if old is not None:
                    for name in self._specs:
                        self._carry(name, old, old_at, seg, at, self.numels[i], old_reach[i])
                at += self.numels[i]

    @staticmethod
    def _carry(name: str, old: Segment, old_at: int, new: Segment, at: int, size: int, rows: Reach) -> None:
        src, dst = old.buffers.get(name), new.buffers.get(name)
        if src is None or dst is None:
            return
        for objective in rows:
            j, k = old.row_of(objective), new.row_of(objective)
            if j is not None and k is not None:
                dst[..., k, at : at + size].copy_(src[..., j, old_at : old_at + size])

    def plan(self, reach: Sequence[Reach]) -> List[Tuple[Reach, List[int]]]:
        """The segments ``reach`` lays out, in order: each one's rows and its parameters
        (by group, so that group ranges are contiguous). Changes nothing."""
        by_reach: Dict[Reach, List[int]] = {}
        for i, r in enumerate(reach):
            by_reach.setdefault(tuple(r), []).append(i)
        return [(rows, sorted(members, key=lambda i: (self.group_of[i], i))) for rows, members in by_reach.items()]

    def _build(self) -> None:
        self.segments = []
        lo = 0
        for rows, members in self.plan(self.reach):
            groups, offsets, at = [], [0], 0
            for i in members:
                if not groups or groups[-1] != self.group_of[i]:
                    if groups:
                        offsets.append(at)
                    groups.append(self.group_of[i])
                at += self.numels[i]
            offsets.append(at)
            seg = Segment(rows, members, [self.params[i] for i in members], [self.shapes[i] for i in members], groups,
                          torch.tensor(offsets, dtype=torch.int64), lo, lo + at)
            for name, spec in self._specs.items():
                seg.buffers[name] = self._alloc(seg, spec)
            self.segments.append(seg)
            lo += at
        self._where = {i: (seg, k) for seg in self.segments for k, i in enumerate(seg.index)}
        self.out_views: List[Tensor] = []
        if self._output:
            order = [i for seg in self.segments for i in seg.index]
            views = split_views(self.out, [self.shapes[i] for i in order])
            position = {i: k for k, i in enumerate(order)}
            self.out_views = [views[position[i]] for i in range(len(self.params))]

    def _alloc(self, seg: Segment, spec: BufferSpec) -> Tensor:
        return torch.zeros((*spec.lead, len(seg.rows), seg.numel), device=self.device, dtype=spec.dtype)

    def locate(self, i: int) -> Tuple[Segment, int]:
        """Parameter i's segment and its position there."""
        return self._where[i]

    # ---------------------------------------------------------------- buffers
    def add_buffer(self, name: str, dtype: torch.dtype, lead: Tuple[int, ...] = ()) -> None:
        """Give every segment a zeroed per-row buffer ``name``; a new shape re-allocates it."""
        spec = BufferSpec(tuple(lead), dtype)
        if self._specs.get(name) == spec:
            return
        self._specs[name] = spec
        for seg in self.segments:
            seg.buffers[name] = self._alloc(seg, spec)
            seg._views = {k: v for k, v in seg._views.items() if k[0] != name}

    def buffer_dtype(self, name: str) -> torch.dtype:
        """The dtype of buffer ``name`` (every segment's alike)."""
        return self._specs[name].dtype

    def has_buffer(self, name: str) -> bool:
        return name in self._specs

    def buffers(self, name: str) -> List[Tensor]:
        """Buffer ``name`` of every segment that holds a row."""
        return [seg.buffers[name] for seg in self.segments if seg.rows]

    def zero_(self, name: str) -> None:
        for t in self.buffers(name):
            t.zero_()

    @property
    def reached(self) -> List[Segment]:
        """The segments some objective reaches (the others' output is zero)."""
        return [seg for seg in self.segments if seg.rows]

    def dense(self, name: str) -> Tensor:
        """Buffer ``name`` as the dense ``(*lead, M, N)`` tensor (parameters in their given
        order, zeros where no objective reaches): for tests and inspection, not the step."""
        spec = self._specs[name]
        full = torch.zeros((*spec.lead, self.num_objectives, self.num_elements), device=self.device, dtype=spec.dtype)
        starts = [0]
        for n in self.numels:
            starts.append(starts[-1] + n)
        for seg in self.reached:
            at = 0
            for i in seg.index:
                for j, objective in enumerate(seg.rows):
                    full[..., objective, starts[i] : starts[i + 1]] = seg.buffers[name][..., j, at : at + self.numels[i]]
                at += self.numels[i]
        return full

    def rows_held(self) -> int:
        """Stored rows x elements: sum over segments of |R| * N_s."""
        return sum(len(seg.rows) * seg.numel for seg in self.segments)

    def num_parts(self, by: str) -> int:
        """How many groups (``by="group"``) or parameters (``"tensor"``) there are."""
        return self.num_groups if by == "group" else len(self.params)

    def scatter_gram(self, seg: Segment, local: Tensor, into: Tensor, by: str = "group") -> None:
        """Add a segment's Gram matrices (one ``|R| x |R|`` per part, ``Segment.parts(by)``)
        to the global ``parts x M x M``."""
        rows = torch.tensor(seg.rows, device=into.device)
        for k, part in enumerate(seg.parts(by)[0]):
            into[part].index_put_((rows[:, None], rows[None, :]), local[k].to(into.device), accumulate=True)
