"""FSDP2 (``torch.distributed.fsdp.fully_shard``): its sharded gradients are the rows.

A ``fully_shard``ed model's parameters are DTensors, each rank holding a dim-0 chunk.
In every backward FSDP2 reduce-scatters (and averages) the gradients itself and hands
each parameter its sharded gradient, calling the parameter's post-accumulate-grad hooks.
The calibrator's hook moves that shard (``1/world`` of the parameter, never the whole)
into the objective's rows of a layout built on the local chunks, and clears ``.grad``
so the next objective's backward starts from nothing. The calibrated output, also
local, becomes ``.grad`` as a sharded DTensor over it, as the optimizer expects.

The reach comes from the hooks (which parameters got a gradient in objective m's
backward): autograd's graph leads to FSDP2's unsharded parameters, not to these.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .collect import add_to_rows
from .layout import Layout, dim0_rows, shard_shape

Tensor = torch.Tensor


@dataclass
class FSDPSharding:
    """The mesh of FSDP2 parameters: its group, this rank, the world, each parameter's rows."""

    group: Any
    rank: int
    world: int
    rows: List[Tuple[int, int]]


def fsdp_sharding(params: Sequence[Tensor]) -> Optional[FSDPSharding]:
    """The sharding of FSDP2 (DTensor) parameters; None for plain tensors; ValueError for
    DTensors this calibrator cannot take (a mix, several meshes, other placements)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return None
    is_dt = [isinstance(p, DTensor) for p in params]
    if not any(is_dt):
        return None
    if not all(is_dt):
        raise ValueError("params: some are DTensors (fully_shard) and some plain tensors; give the calibrator the "
                         "parameters of fully_shard-ed modules only, or none (docs/guide.md, \"Which distributed setup to pick\")")
    mesh = params[0].device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"params: FSDP2 parameters on a {mesh.ndim}-D device mesh (HSDP) are not supported; use a 1-D mesh")
    rank, world = mesh.get_local_rank(), mesh.size()
    rows = []
    for p in params:
        if p.device_mesh != mesh:
            raise ValueError("params: FSDP2 parameters on different device meshes; use one calibrator per mesh")
        if tuple(p.placements) != (Shard(0),):
            raise ValueError(f"params: a DTensor parameter placed {tuple(p.placements)}; the calibrator takes "
                             "fully_shard's dim-0 sharding (Shard(0),)")
        r = dim0_rows(p.shape, rank, world)
        if shard_shape(p.shape, r) != p.to_local().shape:
            raise ValueError(f"params: a DTensor of shape {tuple(p.shape)} holds a local shard of shape "
                             f"{tuple(p.to_local().shape)} on rank {rank}, not the chunk fully_shard makes")
        rows.append(r)
    return FSDPSharding(mesh.get_group(), rank, world, rows)


class FSDPGradients:
    """Moves FSDP2's sharded per-objective gradients into the rows; writes DTensor ``.grad``."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.active: Optional[int] = None  # the objective whose backward runs, or None
        self._stash: Dict[int, Tensor] = {}
        me = weakref.ref(self)

        def hook(i: int):
            def on_grad(p: Tensor) -> None:
                owner = me()
                if owner is not None and owner.active is not None:
                    owner._stash[i] = p.grad.to_local()
                    p.grad = None
            return on_grad

        for i, p in enumerate(self.params):  # no-ops once this object is gone (a weak reference)
            p.register_post_accumulate_grad_hook(hook(i))
        self._grads: List[Tensor] = []
        self._grads_of: Optional[List[Tensor]] = None

    def take(self, layout: Layout, objective: int, sample: int) -> None:
        """After objective ``objective``'s backward: grow the reach to the parameters that
        got a shard, and add each shard into its row."""
        stash, self._stash = self._stash, {}
        add_to_rows(layout, objective, sample, stash)

    def write(self, out_views: Sequence[Tensor]) -> None:
        """``.grad`` := sharded DTensors over the local calibrated output (cached per layout)."""
        from torch.distributed.tensor import DTensor

        if self._grads_of is None or any(a is not b for a, b in zip(self._grads_of, out_views)):
            self._grads = [DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride()) for p, v in zip(self.params, out_views)]
            self._grads_of = list(out_views)
        for p, g in zip(self.params, self._grads):
            p.grad = g
