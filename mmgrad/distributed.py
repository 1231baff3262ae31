"""Averaging per-objective gradients across data-parallel ranks (``torch.distributed``).

DDP's reducer hooks the accumulation of ``.grad`` once per backward; the calibrator runs
M backward passes per forward (or an ``autograd.grad``), so it averages its own M x N
buffer instead: bucketed asynchronous all-reduces, each launched as soon as its rows
are final so communication overlaps with the next objective's backward.

>>> import torch, mmgrad
>>> mmgrad.distributed.resolve_group(None) is None   # no process group initialised
True
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Set

import torch
import torch.distributed as dist

Tensor = torch.Tensor

#: DDP's default bucket size: large enough to amortise latency, small enough to overlap.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def resolve_group(process_group: Any) -> Optional[Any]:
    """The group to average over: ``None`` -> the world if initialised with > 1 rank; ``False`` -> none."""
    if process_group is False:
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised (call init_process_group first)")
    if dist.get_world_size(process_group) == 1:
        return None
    return process_group


class GradientAverager:
    """Launches bucketed async all-reduce (sum) of tensors; ``wait`` finishes them.

    The division by the world size is left to the caller, who folds it into a pass it
    makes anyway (the calibrator's prescale), so averaging costs no extra pass.
    """

    def __init__(self, process_group: Any, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int; got {bucket_bytes!r}")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.bucket_bytes = bucket_bytes
        self._works: List[Any] = []
        self._coalesced: List[Any] = []  # (flat, tensors) to average and scatter back after wait

    def launch(self, flat: Tensor) -> None:
        """All-reduce a contiguous 1-D tensor in buckets, without waiting."""
        per_bucket = max(1, self.bucket_bytes // flat.element_size())
        for chunk in flat.split(per_bucket):
            self._works.append(dist.all_reduce(chunk, group=self.group, async_op=True))

    def launch_averaged(self, tensors: Iterable[Tensor]) -> None:
        """All-reduce several tensors coalesced; ``wait`` writes their average back in place."""
        by_kind: dict = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for same in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            self.launch(flat)
            self._coalesced.append((flat, same))

    def wait(self) -> None:
        """Block until every launched all-reduce is done; average the coalesced tensors back."""
        for work in self._works:
            work.wait()
        self._works = []
        for flat, same in self._coalesced:
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                torch.div(part.view_as(t), self.world_size, out=t)
        self._coalesced = []


def broadcast_parameters(params: Iterable[Tensor], src: int = 0, process_group: Any = None) -> None:
    """Copy rank ``src``'s parameter values to every rank, as DDP does at construction.

    Use it when the model is not wrapped in ``DistributedDataParallel``.
    """
    group = resolve_group(process_group)
    if group is None:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src, group=group)


def union_reach(reach: Sequence[Iterable[int]], num_objectives: int, group: Any, device: torch.device) -> List[Set[int]]:
    """The objectives reaching each parameter on any rank (one small all-reduce).

    Ranks exchange rows objective by objective and segment by segment, so they must lay
    out the same rows even when a rank's batch leaves a path unused."""
    flags = torch.zeros(len(reach), num_objectives, dtype=torch.float32, device=device)
    for i, objectives in enumerate(reach):
        flags[i, list(objectives)] = 1.0
    dist.all_reduce(flags, group=group)
    return [set(row.nonzero().flatten().tolist()) for row in flags.cpu()]
