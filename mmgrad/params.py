"""Which parameters a calibrator takes, and what to call them in errors.

``FusedCalibrator`` takes parameters as an optimizer does (tensors, or groups of them
as ``{"params": ...}`` dicts) and also as ``model.named_parameters()`` pairs, in
which case every error and warning names the parameter (``'audio.conv1.weight'``)
instead of numbering it.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
>>> chosen = parse_params([{"params": model[0].named_parameters(prefix="0")},
...                        {"params": model[1].named_parameters(prefix="1")}])
>>> [len(g) for g in chosen.groups], chosen.names
([2, 2], ['0.weight', '0.bias', '1.weight', '1.bias'])
>>> chosen.label(2)
"'1.weight' (shape (1, 2))"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import _validation as V

Tensor = torch.Tensor
ParamsArg = Union[Iterable[Tensor], Iterable[Tuple[str, Tensor]], Iterable[Dict[str, Any]]]


def label(p: Tensor, name: Optional[str], index: Optional[int] = None) -> str:
    """``'enc.weight' (shape (4, 3))`` when the name is known, else ``parameter 3 (shape (4, 3))``."""
    if name:
        return f"{name!r} (shape {tuple(p.shape)})"
    return f"{'a parameter' if index is None else f'parameter {index}'} (shape {tuple(p.shape)})"


@dataclass
class ParamSet:
    """The trainable parameters, grouped; their names (None where given unnamed); and the
    parameters left out because they were frozen (``requires_grad=False``) when given."""

    groups: List[List[Tensor]]
    names: List[Optional[str]]
    frozen: List[Tuple[Optional[str], Tensor]]

    @property
    def params(self) -> List[Tensor]:
        return [p for grp in self.groups for p in grp]

    def label(self, index: int) -> str:
        """How errors name parameter ``index`` of ``params``."""
        return label(self.params[index], self.names[index], index)


def _entries(items: Sequence[Any], where: str) -> List[Tuple[Optional[str], Any]]:
    """(name, tensor) pairs from tensors or ``named_parameters()`` pairs."""
    out: List[Tuple[Optional[str], Any]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)
        else:
            out.append((None, item))
    for name, p in out:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params{where} must hold tensors or (name, tensor) pairs; got {type(p).__name__}")
    return out


def parse_params(params: ParamsArg) -> ParamSet:
    """Parameters, ``named_parameters()`` pairs, or ``[{"params": ...}, ...]`` groups of
    either, as groups of trainable leaves with their names; checked."""
    if isinstance(params, torch.nn.Module):
        raise TypeError(f"params must be the parameters, not the module: pass {type(params).__name__}.parameters() "
                        "or .named_parameters() (named, errors name the parameter)")
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of dicts, not a single tensor")
    if isinstance(params, dict):
        raise TypeError("params must be a list of parameter groups ([{'params': ...}, ...]), not one dict")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, (name, tensor) pairs or dicts; "
                        f"got {type(params).__name__}") from None
    if not items:
        raise ValueError("params is empty: give the parameters to calibrate")
    is_group = [isinstance(d, dict) for d in items]
    if all(is_group):
        raw_groups = []
        for gi, d in enumerate(items):
            extra = sorted(set(d) - {"params"})
            if extra:
                raise ValueError(f"parameter groups take only the key 'params'; got {extra}")
            if "params" not in d:
                raise ValueError(f"params (group {gi}) has no 'params' key")
            group = d["params"]
            if isinstance(group, torch.nn.Module):
                raise TypeError(f"params (group {gi}) holds a module: pass {type(group).__name__}.parameters()")
            group = [group] if isinstance(group, torch.Tensor) else list(group)
            raw_groups.append(_entries(group, f" (group {gi})"))
    elif not any(is_group):
        raw_groups = [_entries(items, "")]
    else:
        raise TypeError("params must be all tensors or all dicts with 'params', not a mix")
    seen: Dict[int, str] = {}
    groups: List[List[Tensor]] = []
    names: List[Optional[str]] = []
    frozen: List[Tuple[Optional[str], Tensor]] = []
    for grp in raw_groups:
        kept = []
        for name, p in grp:
            what = label(p, name, len(seen))
            if id(p) in seen:
                raise ValueError(f"params: {what} appears twice (first as {seen[id(p)]})")
            seen[id(p)] = what
            if not p.is_leaf:
                raise ValueError(f"params: {what} is not a leaf tensor (not a parameter)")
            if p.requires_grad:
                kept.append(p)
                names.append(name)
            else:  # frozen parameters take no part; watched in case they are unfrozen
                frozen.append((name, p))
        if kept:
            groups.append(kept)
    if not groups:
        raise ValueError("params: every parameter has requires_grad=False; nothing to calibrate")
    chosen = ParamSet(groups, names, frozen)
    flat = chosen.params
    devices = {p.device for p in flat}
    if len(devices) > 1:
        raise ValueError(f"params must all be on one device; got {sorted(map(str, devices))} (use one calibrator per device)")
    dtypes = {p.dtype for p in flat}
    if len(dtypes) > 1:
        raise TypeError(f"params must share one dtype; got {sorted(map(str, dtypes))} (use one calibrator per dtype)")
    if flat[0].dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"params must be floating point; got {flat[0].dtype}")
    sparse = next((i for i, p in enumerate(flat) if p.layout != torch.strided), None)
    if sparse is not None:
        raise TypeError(f"params must be dense (strided) tensors; got a {flat[sparse].layout} parameter, "
                        f"{chosen.label(sparse)}")
    return chosen
