"""Alias of ``mmgrad.training.models``, where it lives, for existing imports."""

import sys

from .training import models as _module

sys.modules[__name__] = _module
