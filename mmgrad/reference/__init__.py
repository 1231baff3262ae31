"""The pure-PyTorch oracle: every function of docs/spec.md §6, in any float dtype, on any device.

``mmgrad.reference.X`` is what every kernel backend is tested against; use
``mmgrad.ops.X(..., backend=...)`` to run the fast versions.
"""

from .bogc import (
    EVIDENCE_MAX,
    bogc_from_moments,
    bogc_sample_step,
    bogc_step,
    ds_combine,
    ema_moments,
    ema_weights,
    opinions,
    sample_moments,
    state_from_moments,
)
from . import gramian  # the Gramian baselines' weights (upgrad_weights, ...)
from .gramian import dual_cone_weights
from .finite import all_finite

#: the backend's name in ``backend=``
NAME = "reference"
#: no step on the reference runs without reading values on the host
SYNC_FREE = False
from .moo import (combine, combine_and_gram, gram, mgda_weights, mimo_weights, mmpareto_tensor_weights, mmpareto_weights,
                  moo_weights, ogm_coefficients, ogm_coefficients_from_scores)

__all__ = [
    "EVIDENCE_MAX",
    "all_finite",
    "bogc_from_moments",
    "bogc_sample_step",
    "bogc_step",
    "combine",
    "combine_and_gram",
    "ds_combine",
    "dual_cone_weights",
    "ema_moments",
    "ema_weights",
    "gram",
    "mgda_weights",
    "mimo_weights",
    "mmpareto_tensor_weights",
    "mmpareto_weights",
    "moo_weights",
    "ogm_coefficients",
    "ogm_coefficients_from_scores",
    "opinions",
    "sample_moments",
    "state_from_moments",
]
