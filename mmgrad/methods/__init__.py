"""The calibration methods, one module per family, found by name through ``METHODS``.

Adding a method: a class deriving ``Method`` (``_base.py``) in its own module, holding
its options, their checks and its step, plus one line in ``METHODS`` below. A Gramian
method (Gram matrices in, weights out) derives ``Weighting`` and gives only its
``weights``; ``register`` adds one from outside the package.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

from ._base import Method, StepContext, StepResult
from ._aligned_mtl import AlignedMTL
from ._bogc import BOGC
from ._cagrad import CAGrad
from ._dual_cone import DualProj, UPGrad
from ._imtl_g import IMTLG
from ._moo import MGDA, MMPareto
from ._nash_mtl import NashMTL
from ._ogm import OGM, ogm_scores
from ._pcgrad import PCGrad
from ._sum import Sum
from ._weighted import MIMO, Mean
from ._weighting import Weighting

METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (BOGC, MGDA, MMPareto, MIMO, OGM, Sum, Mean, UPGrad, DualProj,
                                                                 PCGrad, CAGrad, IMTLG, AlignedMTL, NashMTL)}
#: mmgrad's own methods, which the tools, benchmarks and tests run (``register`` adds to
#: ``METHODS`` only)
BUILTIN: Tuple[str, ...] = tuple(METHODS)


def register(cls: Type[Method]) -> Type[Method]:
    """Make ``FusedCalibrator(method=cls.name)`` find ``cls`` (a ``Weighting`` or other
    ``Method`` subclass); returns it, so it can decorate the class."""
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise TypeError(f"cls must be a subclass of mmgrad.methods.Method (e.g. Weighting); got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string; got {cls.name!r}")
    known = METHODS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    METHODS[cls.name] = cls
    return cls


__all__ = ["BUILTIN", "METHODS", "Method", "StepContext", "StepResult", "Weighting", "ogm_scores", "register"]
