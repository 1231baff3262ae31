"""The statistics vector of the fused BOGC step, read in one place.

``csrc/mmgrad_math.h``'s ``StatsLayout`` defines it, float64::

    [sum_sq, out_sq, nonfinite, u_sum, conflict_sum, share_count | share_sum (M) | Gram (G x M x M)]

The CPU kernels return one vector for the call; the CUDA and Triton kernels one per block,
of one group (G = 1). ``tests/test_kernels_cpu.py`` holds ``SCALARS`` and ``width``
against the extension's ``stats_layout``.
"""

from __future__ import annotations

from typing import Dict

import torch

Tensor = torch.Tensor

#: the scalar statistics, in their order at the start of the vector
SCALARS = ("sum_sq", "out_sq", "nonfinite", "u_sum", "conflict_sum", "share_count")
#: offset of each scalar
OFFSET = {name: i for i, name in enumerate(SCALARS)}
#: offset of the M shares; the Gram matrices follow them
SHARES = len(SCALARS)


def width(m: int, groups: int = 1) -> int:
    """Length of the vector for M objectives and G groups."""
    return SHARES + m + groups * m * m


def parse(stats: Tensor, m: int, groups: int, n: int) -> Dict[str, Tensor]:
    """The vector as the reference's statistics dict (N: the coordinates it covers)."""
    share_count = stats[OFFSET["share_count"]]
    share_sum = stats[SHARES : SHARES + m]
    return {
        "gram": stats[SHARES + m : width(m, groups)].view(groups, m, m),
        "sum_sq": stats[OFFSET["sum_sq"]],
        "out_sq": stats[OFFSET["out_sq"]],
        "nonfinite": stats[OFFSET["nonfinite"]].to(torch.int64),
        "uncertainty": stats[OFFSET["u_sum"]] / max(n, 1),
        "conflict": stats[OFFSET["conflict_sum"]] / max(n, 1),
        "weights": share_sum / share_count.clamp_min(1.0),
        # unnormalised, so a caller can merge the weights of several calls (segments)
        "share_sum": share_sum,
        "share_count": share_count,
    }


def from_block_partials(parts: Tensor, m: int, groups: int, n: int) -> Dict[str, Tensor]:
    """The GPU kernels' ``G x blocks x width(M)`` partials, summed on the device (no host
    synchronisation) into one vector of G groups, then parsed."""
    per_group = parts.sum(dim=1)
    flat = torch.cat([per_group[:, : SHARES + m].sum(0), per_group[:, SHARES + m :].reshape(-1)])
    return parse(flat, m, groups, n)
