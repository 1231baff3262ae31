"""Alias of ``mmgrad.tools.verify``, where it lives, for existing imports."""

import sys

from .tools import verify as _module

sys.modules[__name__] = _module
