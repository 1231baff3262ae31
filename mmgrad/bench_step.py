"""Alias of ``mmgrad.tools.bench_step``, where it lives, for existing imports and ``python -m mmgrad.bench_step``."""

import sys

from .tools import bench_step as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
