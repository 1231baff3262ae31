"""Multi-view classifiers whose losses and parameter groups feed a ``FusedCalibrator``.

Both models take a dict ``{view: n x d_view tensor}`` and predict from any subset of
their views (a missing view's embedding is zero; its experts drop out).

>>> import torch
>>> from mmgrad.training.models import LateFusion
>>> model = LateFusion({"a": 5, "b": 3}, num_classes=4)
>>> x, y = {"a": torch.randn(8, 5), "b": torch.randn(8, 3)}, torch.randint(0, 4, (8,))
>>> [round(float(l), 2) >= 0 for l in model.losses(x, y)]   # [fused, view a, view b]
[True, True, True]
>>> model.predict(x, views=["b"]).shape                      # without view a
torch.Size([8, 4])
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor


def encoder(in_dim: int, hidden: int, embed: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed), nn.ReLU())


def _present(all_views: Sequence[str], views: Optional[Sequence[str]]) -> List[str]:
    if views is None:
        return list(all_views)
    unknown = [v for v in views if v not in all_views]
    if unknown:
        raise ValueError(f"views {unknown} are not views of this model {list(all_views)}")
    return [v for v in all_views if v in views]


class LateFusion(nn.Module):
    """One encoder per view, a fusion head on the concatenated embeddings, one head per view.

    ``losses`` returns the M = V + 1 objectives ``[fused, view_1, ..., view_V]`` and
    ``param_groups`` one group per encoder (the heads are left out: each is reached by
    one objective only, so they train on the plain summed gradient).
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        if not dims:
            raise ValueError("dims must name at least one view")
        self.views = tuple(dims)
        self.embed_dim = embed
        self.encoders = nn.ModuleDict({v: encoder(d, hidden, embed) for v, d in dims.items()})
        self.fusion_head = nn.Linear(embed * len(dims), num_classes)
        self.view_heads = nn.ModuleDict({v: nn.Linear(embed, num_classes) for v in dims})

    def embed(self, x: Mapping[str, Tensor], views: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        return {v: self.encoders[v](x[v]) for v in _present(self.views, views)}

    def forward(self, x: Mapping[str, Tensor], views: Optional[Sequence[str]] = None):
        """Fused logits and each present view's own logits."""
        z = self.embed(x, views)
        n = next(iter(x.values())).shape[0]
        zero = next(iter(z.values())).new_zeros(n, self.embed_dim) if z else None
        fused = self.fusion_head(torch.cat([z.get(v, zero) for v in self.views], dim=1))
        return fused, {v: self.view_heads[v](zv) for v, zv in z.items()}

    def predict(self, x: Mapping[str, Tensor], views: Optional[Sequence[str]] = None) -> Tensor:
        return self(x, views)[0]

    def losses(self, x: Mapping[str, Tensor], y: Tensor) -> List[Tensor]:
        fused, per_view = self(x)
        return [F.cross_entropy(fused, y), *(F.cross_entropy(per_view[v], y) for v in self.views)]

    def param_groups(self) -> List[dict]:
        return [{"params": list(self.encoders[v].parameters())} for v in self.views]

    def view_features(self, x: Mapping[str, Tensor], view: str) -> Tensor:
        """What a linear probe of ``view`` reads: its encoder's embedding."""
        return self.encoders[view](x[view])


class I2M2(nn.Module):
    """Inter- and intra-modality experts (Madaan et al., "Jointly modeling inter- & intra-modality
    dependencies"), combined as a product of experts: summed log-probabilities.

    Objectives: ``[combined, intra_1, ..., intra_V]``; plain I2M2 trains ``combined``
    only. ``param_groups``: one per view, its intra expert plus the inter expert's
    encoder of that view.
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        self.views = tuple(dims)
        self.intra = nn.ModuleDict({v: nn.Sequential(encoder(d, hidden, embed), nn.Linear(embed, num_classes)) for v, d in dims.items()})
        self.inter = LateFusion(dims, num_classes, hidden, embed)

    def forward(self, x: Mapping[str, Tensor], views: Optional[Sequence[str]] = None):
        present = _present(self.views, views)
        inter = self.inter(x, present)[0]
        intra = {v: self.intra[v](x[v]) for v in present}
        combined = F.log_softmax(inter, dim=1) + sum(F.log_softmax(l, dim=1) for l in intra.values())
        return combined, intra

    def predict(self, x: Mapping[str, Tensor], views: Optional[Sequence[str]] = None) -> Tensor:
        return self(x, views)[0]

    def losses(self, x: Mapping[str, Tensor], y: Tensor) -> List[Tensor]:
        combined, intra = self(x)
        return [F.cross_entropy(combined, y), *(F.cross_entropy(intra[v], y) for v in self.views)]

    def param_groups(self) -> List[dict]:
        return [{"params": [*self.intra[v].parameters(), *self.inter.encoders[v].parameters()]} for v in self.views]

    def view_features(self, x: Mapping[str, Tensor], view: str) -> Tensor:
        return torch.cat([self.intra[view][0](x[view]), self.inter.encoders[view](x[view])], dim=1)
