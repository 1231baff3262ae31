"""Whether gradients are finite: the read a step makes before it writes any state (docs/spec.md §7)."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim bool on the tensors' device: every entry of every tensor is finite. One read
    each (their max-norms are inf/NaN exactly when an entry is); True for no tensors.

    >>> all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    tensor(False)
    """
    tensors = list(tensors)
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all()
