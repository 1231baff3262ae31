"""The small two-view model the calibrator, checkpoint and distributed tests train."""

from __future__ import annotations

import torch
from torch import nn

F = nn.functional


class TwoView(nn.Module):
    """Two encoders, a fusion head and per-view heads; a third input the unimodal heads never see."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.enc_b = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.extra = nn.Linear(3, 4)  # reached by the fusion loss only
        self.fuse = nn.Linear(20, 3)
        self.head_a, self.head_b = nn.Linear(8, 3), nn.Linear(8, 3)
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
