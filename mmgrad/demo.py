"""Alias of ``mmgrad.tools.demo``, where it lives, for existing imports."""

import sys

from .tools import demo as _module

sys.modules[__name__] = _module
