"""ZeRO-2 rows (docs/spec.md §8, ``FusedCalibrator(..., shard=True)``): each rank holds a slice.

Every calibrated parameter is split along dim 0 as FSDP2 splits it (``layout.dim0_rows``);
rank r's layout holds, per segment and objective, only the rows of its parameters'
r-th chunks. After each objective's backward, its full gradients are *reduce-scattered*
(summed; the step divides by the world size with its prescale), in buckets, so every
rank receives exactly its chunks; the reduction overlaps the next objective's backward,
as the all-reduce path's does. After the step, the calibrated chunks are *all-gathered*
into the full ``.grad``. Everything else global is tiny and all-reduced by the methods
(``methods._base.all_reduce_sum``).

A collective splits its input into ``world`` equal parts, so each parameter travels as
``world`` chunks of ``ceil(d0 / world) * (numel / d0)`` elements, the tail zero-padded;
a bucket packs several parameters rank-major (``[world, chunk_1 + chunk_2 + ...]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .collect import GRADS
from .layout import Layout, dim0_rows, shard_shape

Tensor = torch.Tensor



def _reduce_scatter(output: Tensor, input: Tensor, group: Any) -> Any:
    # torch 2.13's name; the *_tensor spelling is deprecated there and the only one before
    # (looked up per call, so a benchmark's byte counter sees it)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=True)


def _all_gather(output: Tensor, input: Tensor, group: Any) -> Any:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=True)


@dataclass
class _Launched:
    work: Any
    received: Tensor
    staging: Tensor  # kept alive until the collective finishes
    targets: List[Tuple[Tensor, int, int]]  # (row slice to add into, offset in received, count)


class RowSharder:
    """Reduce-scatters per-objective gradients into this rank's rows; all-gathers outputs.

    Args:
        group: the process group the rows are sharded over.
        params: the calibrated parameters, in the layout's order.
        bucket_bytes: the largest input of one collective.
    """

    def __init__(self, group: Any, params: Sequence[Tensor], bucket_bytes: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bucket_bytes = bucket_bytes
        self.params = list(params)
        #: the rows [start, stop) of dim 0 of each parameter this rank holds
        self.rows: List[Tuple[int, int]] = [dim0_rows(p.shape, self.rank, self.world) for p in self.params]
        # elements per rank of each parameter in a collective (padded): rank 0's chunk is a full one
        self.chunk: List[int] = [math.prod(shard_shape(p.shape, dim0_rows(p.shape, 0, self.world))) for p in self.params]
        self._batches: List[List[_Launched]] = []

    # ------------------------------------------------------- reduce-scatter
    def scatter(self, layout: Layout, objective: int, sample: int, grads: Sequence[Optional[Tensor]]) -> None:
        """Launch the reduce-scatter of objective ``objective``'s full gradients ``grads``
        (one per parameter, None = zero) into micro-batch ``sample``'s rows of it."""
        items = []  # (param index, the row slice it lands in)
        for seg in layout.reached:
            j = seg.row_of(objective)
            if j is None:
                continue
            row = seg.rows_view(GRADS)[sample, j]
            at = 0
            for i in seg.index:
                n = layout.numels[i]
                items.append((i, row[at : at + n]))
                at += n
        dst, batch = dict(items), []
        for bucket in self._buckets([i for i, _ in items]):
            width = sum(self.chunk[i] for i in bucket)
            staging = torch.zeros(self.world, width, dtype=layout.dtype, device=layout.device)
            received = torch.empty(width, dtype=layout.dtype, device=layout.device)
            targets, off = [], 0
            for i in bucket:
                self._pack(staging[:, off : off + self.chunk[i]], grads[i], self.params[i].numel())
                targets.append((dst[i], off, dst[i].numel()))
                off += self.chunk[i]
            work = _reduce_scatter(received, staging.view(-1), self.group)
            batch.append(_Launched(work, received, staging, targets))
        self._batches.append(batch)

    def wait(self, keep_last: bool = False) -> None:
        """Finish the launched reduce-scatters (all, or all but the last objective's) and
        add what each brought into its rows."""
        done = self._batches[:-1] if keep_last else self._batches
        self._batches = self._batches[-1:] if keep_last and self._batches else []
        for batch in done:
            for launched in batch:
                launched.work.wait()
                for row, off, n in launched.targets:
                    row.add_(launched.received[off : off + n])

    # ----------------------------------------------------------- all-gather
    def gather(self, local: Sequence[Tensor], full: Sequence[Tensor]) -> None:
        """``full[i]`` := parameter i's whole tensor, from every rank's ``local[i]`` chunk."""
        launched = []
        for bucket in self._buckets(range(len(self.params))):
            width = sum(self.chunk[i] for i in bucket)
            send = torch.zeros(width, dtype=full[0].dtype, device=full[0].device)
            off = 0
            for i in bucket:
                send[off : off + local[i].numel()].copy_(local[i].reshape(-1))
                off += self.chunk[i]
            received = torch.empty(self.world, width, dtype=send.dtype, device=send.device)
            work = _all_gather(received.view(-1), send, self.group)
            launched.append((work, received, bucket))
        for work, received, bucket in launched:
            work.wait()
            off = 0
            for i in bucket:
                n = full[i].numel()
                full[i].view(-1).copy_(received[:, off : off + self.chunk[i]].reshape(-1)[:n])
                off += self.chunk[i]

    # -------------------------------------------------------------- helpers
    def _buckets(self, indices: Sequence[int]) -> List[List[int]]:
        """Consecutive parameters, each bucket's collective input at most ``bucket_bytes``
        (one parameter larger than that travels alone)."""
        size = self.params[0].element_size() * self.world
        buckets: List[List[int]] = []
        used = 0
        for i in indices:
            if self.chunk[i] == 0:
                continue
            if buckets and used + self.chunk[i] * size <= self.bucket_bytes:
                buckets[-1].append(i)
                used += self.chunk[i] * size
            else:
                buckets.append([i])
                used = self.chunk[i] * size
        return buckets

    @staticmethod
    def _pack(dst: Tensor, grad: Optional[Tensor], numel: int) -> None:
        """Lay a full gradient out as ``world`` chunks (the rows of ``dst``), zero-padded."""
        if grad is None:
            return
        flat = grad.reshape(-1)
        chunk = dst.shape[1]
        whole = numel // chunk
        dst[:whole].copy_(flat[: whole * chunk].view(whole, chunk))
        if whole * chunk < numel:
            dst[whole, : numel - whole * chunk].copy_(flat[whole * chunk :])
