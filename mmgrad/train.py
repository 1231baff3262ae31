"""Alias of ``mmgrad.training.train``, where it lives, for existing imports."""

import sys

from .training import train as _module

sys.modules[__name__] = _module
