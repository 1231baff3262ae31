"""One version, from one place; a Triton older than mmgrad supports is refused up front,
with the version and the fix, never deep inside a kernel."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmgrad

ROOT = Path(__file__).resolve().parent.parent
backends_module = importlib.import_module("mmgrad.backends")


def test_one_version_everywhere():
    assert re.fullmatch(r"\d+\.\d+\.\d+", mmgrad.__version__)
    out = subprocess.run([sys.executable, "-m", "mmgrad", "--version"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == f"mmgrad {mmgrad.__version__}"
    setup_py = (ROOT / "setup.py").read_text()
    assert "_version.py" in setup_py and not re.search(r"version=\"\d", setup_py)  # read, not written twice


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmgrad", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "MMGRAD_QUIET": "1"})


def test_the_cli_explains_itself():
    from mmgrad.__main__ import COMMANDS

    out = _cli("--help")
    assert out.returncode == 0
    for command in (*COMMANDS, "--version"):
        assert command in out.stdout
    for command in COMMANDS:  # every command has a complete --help, and exits 0 on it
        sub = _cli(command, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: python -m mmgrad {command}"), (command, sub.stderr)
    bad = _cli("nonsense")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_a_bad_choice_is_argparses_error_not_a_traceback():
    out = _cli("verify", "--backends", "gpu")
    assert out.returncode == 2 and "invalid choice: 'gpu'" in out.stderr and "Traceback" not in out.stderr
    out = _cli("verify", "--backends", "cuda")  # a real backend that does not run on CPU tensors here
    assert out.returncode == 2 and "does not run on CPU tensors here" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_an_old_triton_is_refused_with_the_version_and_the_fix(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.5.1" if name == "triton" else real(name))
    why = backends_module.triton_too_old()
    assert "triton 3.5.1" in why and "pip install -U 'triton>=3.6'" in why
    info = backends_module._triton_info()
    assert not info.available and info.reason == why
    monkeypatch.delitem(sys.modules, "mmgrad.kernels.triton_kernels", raising=False)
    with pytest.raises(ImportError, match=r"triton 3\.5\.1 is older than 3\.6"):
        importlib.import_module("mmgrad.kernels.triton_kernels")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_installed_triton_is_supported():
    assert backends_module.triton_too_old() is None
