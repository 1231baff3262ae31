"""The calibrator's state for ``torch.distributed.checkpoint`` (DCP), readable at any world size.

``FusedCalibrator.state_dict()`` is per rank: a sharded calibrator saves its own slices,
which only the same rank of the same world size can load. ``CalibratorState`` wraps a
calibrator as a DCP ``Stateful`` whose tensors are global: each parameter's state rows
as one ``M x *shape`` tensor (zeros where no objective reaches), a ``DTensor`` sharded
along the parameter's dim 0 like the calibrator's own shards (ZeRO-2 or FSDP2), a plain
tensor unsharded. DCP then reshards on load: train at world 2, resume at 4 or 1.

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": ..., "optim": ..., "calibrator": mmgrad.CalibratorState(cal)}, checkpoint_id=path)
    ...  # any world size, a calibrator built over the same parameters with the same method
    dcp.load({"model": ..., "optim": ..., "calibrator": mmgrad.CalibratorState(cal)}, checkpoint_id=path)

The dense rows exist only while saving or loading (``M x N / world`` elements per state
buffer per rank); the reach is saved with them, so loading restores the exact layout.

>>> import torch, mmgrad
>>> enc = torch.nn.Linear(3, 2)
>>> cal = mmgrad.FusedCalibrator(enc.parameters(), 2, method="bogc")
>>> x = torch.randn(4, 3)
>>> cal.backward([enc(x).pow(2).mean(), enc(x).sum()])
>>> state = mmgrad.CalibratorState(cal).state_dict()
>>> state["reach"], tuple(state["mean.0"].shape)     # weight: both objectives, rows x shape
([(0, 1), (0, 1)], (2, 2, 3))
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .layout import Layout

Tensor = torch.Tensor
FORMAT = "dcp-1"
_SCALARS = ("method", "num_objectives", "options", "step_count", "reach")


class CalibratorState:
    """A DCP ``Stateful`` over ``calibrator``: ``state_dict`` gives global tensors,
    ``load_state_dict`` takes what DCP loaded into them (see the module docstring)."""

    def __init__(self, calibrator: Any) -> None:
        from .calibrator import FusedCalibrator

        if not isinstance(calibrator, FusedCalibrator):
            raise TypeError(f"calibrator must be a FusedCalibrator; got {type(calibrator).__name__}")
        self.cal = calibrator
        self._mesh: Any = None

    # ------------------------------------------------------------------ save
    def state_dict(self) -> Dict[str, Any]:
        cal, lay = self.cal, self.cal.layout
        local = cal.state_dict()
        out: Dict[str, Any] = {k: local[k] for k in _SCALARS}
        # num_elements and group_offsets count whole parameters, sharded or not: world-size free
        out.update(format=FORMAT, version=local["version"], num_elements=local["num_elements"],
                   group_offsets=local["group_offsets"])
        if hasattr(cal._method, "prev_alpha"):  # lagged MOO weights, the same on every rank
            # always a tensor, so that a loading calibrator's template has the key to load into
            prev = local.get("prev_alpha")
            out["has_prev_alpha"] = prev is not None
            out["prev_alpha"] = prev if prev is not None else torch.zeros(
                cal._method.weights_shape, dtype=torch.float64, device=lay.device)
        for name in cal._method.row_state:
            per_param = _dense_rows(lay, local[name], lay.buffer_dtype(name))
            for i, rows in enumerate(per_param):
                out[f"{name}.{i}"] = self._global(rows, lay.params[i])
        return out

    def _global(self, rows: Tensor, param: Tensor) -> Tensor:
        """This rank's ``M x *local`` rows of ``param`` as the global ``M x *shape`` tensor."""
        if self.cal._shard_of is None:
            return rows
        from torch.distributed.tensor import DTensor, Shard

        shape = (rows.shape[0], *param.shape)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(rows, self.mesh(), [Shard(1)], run_check=False, shape=shape, stride=stride)

    def mesh(self) -> Any:
        """The 1-D device mesh the calibrator's shards lie on (FSDP2's, or one over the
        ZeRO-2 process group)."""
        if self._mesh is None:
            cal = self.cal
            mesh = getattr(cal.params[0], "device_mesh", None)
            if mesh is None:
                from torch.distributed.device_mesh import DeviceMesh

                mesh = DeviceMesh.from_group(cal._sharder.group, device_type=cal.device.type)
            self._mesh = mesh
        return self._mesh

    # ------------------------------------------------------------------ load
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """This rank's per-rank state from the global one, loaded by
        ``FusedCalibrator.load_state_dict``, which checks it whole before changing anything."""
        cal, lay = self.cal, self.cal.layout
        if state.get("format") != FORMAT:
            raise ValueError(f"state format {state.get('format')!r}: CalibratorState loads what it saved ({FORMAT!r}); "
                             "a per-rank FusedCalibrator.state_dict() loads with FusedCalibrator.load_state_dict")
        reach = [tuple(r) for r in state["reach"]]
        if len(reach) != len(lay.params):  # before the rows are cut by it
            raise ValueError(f"state reach names {len(reach)} parameters; this calibrator has {len(lay.params)}")
        local = {k: state[k] for k in (*_SCALARS, "num_elements", "group_offsets")}
        local.update(format=3, version=state.get("version"), shard=cal._shard_of)
        if state.get("has_prev_alpha"):
            local["prev_alpha"] = state["prev_alpha"]
        for name in cal._method.row_state:
            rows = [_local(state[f"{name}.{i}"]) for i in range(len(lay.params))]
            local[name] = _segment_rows(lay, reach, rows)
        cal.load_state_dict(local)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _dense_rows(lay: Layout, segments: List[Tensor], dtype: torch.dtype) -> List[Tensor]:
    """Per parameter, ``M x *local_shape`` rows (zeros where unreached) from the per-segment
    ``|R| x N_s`` buffers of a per-rank state dict."""
    rows = [torch.zeros((lay.num_objectives, *shape), dtype=dtype, device=lay.device) for shape in lay.shapes]
    for seg, buf in zip(lay.reached, segments):
        at = 0
        for i in seg.index:
            n = lay.numels[i]
            rows[i][list(seg.rows)] = buf[..., at:at + n].reshape(len(seg.rows), *lay.shapes[i])
            at += n
    return rows


def _segment_rows(lay: Layout, reach: List[tuple], rows: List[Tensor]) -> List[Tensor]:
    """The inverse of ``_dense_rows``: the per-segment buffers ``reach`` lays out
    (``Layout.plan``: the layout itself is left as it is)."""
    return [torch.cat([rows[i][list(seg_rows)].reshape(len(seg_rows), -1) for i in members], dim=1)
            for seg_rows, members in lay.plan(reach) if seg_rows]

