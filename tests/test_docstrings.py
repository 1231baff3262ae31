"""Every runnable example in mmgrad's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import mmgrad

def _has_examples(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None and spec.origin.endswith(".py") and ">>>" in Path(spec.origin).read_text()


MODULES = sorted(m.name for m in pkgutil.walk_packages(mmgrad.__path__, "mmgrad.") if _has_examples(m.name))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (triton) is missing
        pytest.skip(f"{name} does not import here: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
