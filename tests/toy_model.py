"""The small two-view model the calibrator, checkpoint and distributed tests train."""

from __future__ import annotations

import torch
from torch import nn

F = nn.functional


class TwoView(nn.Module):
    """Two encoders, a fusion head and per-view heads; a third input the unimodal heads never see.

    ``hidden`` and ``extra`` size the encoders' and the extra layer's outputs (the sharded
    tests pick sizes that do not split evenly over the ranks)."""

    def __init__(self, dtype=torch.float32, hidden: int = 8, extra: int = 4):
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(6, hidden), nn.Tanh())
        self.enc_b = nn.Sequential(nn.Linear(5, hidden), nn.Tanh())
        self.extra = nn.Linear(3, extra)  # reached by the fusion loss only
        self.fuse = nn.Linear(2 * hidden + extra, 3)
        self.head_a, self.head_b = nn.Linear(hidden, 3), nn.Linear(hidden, 3)
        self.to(dtype)

    def forward(self, xa, xb, xc, y):
        za, zb = self.enc_a(xa), self.enc_b(xb)
        fused = self.fuse(torch.cat([za, zb, self.extra(xc)], 1))
        return [F.cross_entropy(fused, y), F.cross_entropy(self.head_a(za), y), F.cross_entropy(self.head_b(zb), y)]

    def losses(self, *b):
        return self(*b)

    def groups(self):
        return [{"params": self.enc_a.parameters()}, {"params": self.enc_b.parameters()}, {"params": self.extra.parameters()}]


def batch(gen, n=16, dtype=torch.float32):
    return (torch.randn(n, 6, generator=gen, dtype=dtype), torch.randn(n, 5, generator=gen, dtype=dtype),
            torch.randn(n, 3, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen))
