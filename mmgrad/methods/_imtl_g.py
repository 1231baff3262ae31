"""IMTL-G (Liu et al., ICLR 2021), per parameter group: weights that give the update an
equal projection onto every objective's unit gradient, from the Gramian's pseudo-inverse."""

from __future__ import annotations

import torch

from ..reference.gramian import gramian_weights
from ._weighting import Weighting

Tensor = torch.Tensor


class IMTLG(Weighting):
    name = "imtl_g"

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return gramian_weights(grams, self.name)
