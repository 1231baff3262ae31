"""Alias of ``mmgrad.training.data``, where it lives, for existing imports."""

import sys

from .training import data as _module

sys.modules[__name__] = _module
