"""Aligned-MTL (Senushkin et al., CVPR 2023), per parameter group: the preference weights
through the balance transformation of the Gramian's eigen-decomposition."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import _validation as V
from ..reference.gramian import ALIGNED_MTL_SCALES, gramian_weights
from ._weighting import Weighting

Tensor = torch.Tensor


class AlignedMTL(Weighting):
    name = "aligned_mtl"
    defaults = {"pref_vector": None, "scale_mode": "min"}

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        super().check_options(o)
        V.check_pref_vector(o["pref_vector"])
        V.check_choice("scale_mode", o["scale_mode"], ALIGNED_MTL_SCALES)

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        V.check_pref_vector(options["pref_vector"], None if layout is None else layout.num_objectives)

    def weights(self, grams: Tensor, losses: Tensor) -> Tensor:
        return gramian_weights(grams, self.name, pref_vector=self.options["pref_vector"],
                               scale_mode=self.options["scale_mode"])
