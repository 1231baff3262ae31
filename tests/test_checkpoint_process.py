"""A checkpoint loaded in a new process continues bit-identically, on every backend here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mmgrad

from checkpoint_worker import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "TRITON_INTERPRET": "1"}  # lets the triton backend run on CPU tensors
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not mmgrad.backends()["cpu"].available, reason="the C++ extension is not built")),
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_resumes_bit_identically_in_a_new_process(tmp_path, backend):
    for mode in ("first", "resume"):
        subprocess.run([sys.executable, os.path.join(HERE, "checkpoint_worker.py"), mode, backend, str(tmp_path)], env=ENV, check=True)
    for method in CASES:
        saved = torch.load(tmp_path / f"{method}.pt")
        for p, q in zip(saved["uninterrupted"], saved["resumed"]):
            assert torch.equal(p, q), (backend, method, (p - q).abs().max())
