"""Alias of ``mmgrad.tools.bench``, where it lives, for existing imports."""

import sys

from .tools import bench as _module

sys.modules[__name__] = _module
