"""mmgrad: fused gradient calibration for multi-modal learning.

>>> import torch, mmgrad
>>> enc = torch.nn.Linear(4, 2)
>>> cal = mmgrad.FusedCalibrator(enc.parameters(), num_objectives=2, method="mgda")
>>> x = torch.randn(8, 4)
>>> cal.backward([enc(x).pow(2).mean(), (enc(x) - 1).pow(2).mean()])
>>> cal.step()
True
"""

from . import ops, reference
from ._version import __version__
from .backends import backends
from .calibrator import FusedCalibrator, NonFiniteGradientError
from .checkpoint import CalibratorState

__all__ = ["CalibratorState", "FusedCalibrator", "NonFiniteGradientError", "backends", "ops", "reference", "__version__"]
