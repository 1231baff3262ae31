"""The calibration methods, one module per family, found by name through ``METHODS``.

Adding a method: a class deriving ``Method`` (``_base.py``) in its own module, holding
its options, their checks and its step, plus one line in ``METHODS`` below.
"""

from __future__ import annotations

from typing import Dict, Type

from ._base import Method, StepContext, StepResult
from ._bogc import BOGC
from ._moo import MGDA, MMPareto
from ._ogm import OGM
from ._sum import Sum
from ._weighted import MIMO, Mean

METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (BOGC, MGDA, MMPareto, MIMO, OGM, Sum, Mean)}

__all__ = ["METHODS", "Method", "StepContext", "StepResult"]
