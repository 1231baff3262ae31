"""``python -m mmgrad selftest`` on a CPU-only machine: it runs what it can, says what it
skipped and why, and fails (exit 1) when a backend disagrees with the reference."""

from __future__ import annotations

import subprocess
import sys

import torch

from mmgrad.tools import selftest


def test_cpu_selftest_runs_the_cpu_checks_and_names_what_it_skipped(capsys):
    assert selftest.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1. every backend on cpu against the float64 reference" in out
    assert "  cpu: " in out and "function x dtype pairs" in out
    for method in selftest.METHODS:  # a timing row per method, against a copy of the same bytes
        assert f"  cpu      {method}" in out
    if not torch.cuda.is_available():
        assert "skipped: needs a CUDA device (torch sees no CUDA device" in out
        assert "skipped: every GPU check on CUDA tensors" in out
    assert out.rstrip().endswith("skipped)") and "selftest: OK" in out


def test_selftest_fails_when_a_backend_disagrees(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "compare_all", lambda backend, case: {"bogc_step": 1.0})
    assert selftest.main(["--quick", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL cpu bogc_step torch.float32: error 1.00e+00 above 1e-05" in out
    assert "selftest: FAILED: cpu bogc_step" in out


def test_selftest_is_a_command():
    res = subprocess.run([sys.executable, "-m", "mmgrad", "selftest", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--quick" in res.stdout
