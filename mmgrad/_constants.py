"""The numbers and option codes every backend shares, defined once.

The C++ and CUDA kernels read theirs from ``csrc/mmgrad_math.h``; the CPU extension
exports the header's values and ``tests/test_kernels_cpu.py`` holds these against them.
The Triton kernels and the reference import them from here.
"""

from __future__ import annotations

from typing import Dict, Sequence

#: Largest evidence an opinion may carry: keeps u = 2/(e+2) > 0 in float32 (docs/spec.md, decision 1)
EVIDENCE_MAX = 1e30
#: docs/spec.md §4's certificate for the min-norm solve: the duality gap, relative to max_m K_mm
MOO_GAP_TOL = 1e-7
#: The device MOO solver holds one group's Gram matrix in registers: at most this many objectives
MOO_MAX_OBJECTIVES = 16
#: the smallest ``reg_eps`` whose UPGrad/DualProj projections the triton backend solves on
#: the device: below it the regularised Gram's condition number (up to 1 / reg_eps)
#: defeats the float64 face solves (docs/solver.md)
DUAL_CONE_MIN_REG_EPS = 1e-6
#: the Gramian weightings that project onto the dual cone (a device solver on triton)
DUAL_CONE_METHODS = ("upgrad", "dualproj")
#: their options' defaults (TorchJD's): the preference vector (None: the mean) and epsilons
DUAL_CONE_DEFAULTS = {"pref_vector": None, "norm_eps": 1e-4, "reg_eps": 1e-4}

CONFIDENCE_MODES = ("belief", "certainty", "none")
WEIGHT_MODES = ("belief", "precision")
MGDA_NORMALIZATIONS = ("none", "l2", "loss")
#: the Gramian methods the device solver knows, in the order of its method codes
MOO_METHODS = ("mgda", "mmpareto")


def _codes(names: Sequence[str]) -> Dict[str, int]:
    return {name: code for code, name in enumerate(names)}


#: each option's integer code in the kernels (mmgrad_math.h's enums)
CONFIDENCE_CODES = _codes(CONFIDENCE_MODES)
WEIGHT_CODES = _codes(WEIGHT_MODES)
NORMALIZE_CODES = _codes(MGDA_NORMALIZATIONS)
MOO_METHOD_CODES = _codes(MOO_METHODS)
