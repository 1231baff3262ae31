"""Shared fixtures: fresh random inputs each run (the seed is printed on failure)."""

from __future__ import annotations

import os

import pytest
import torch

import mmgrad


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded afresh per test; rerun a failure with MMGRAD_TEST_SEED=<seed>."""
    seed = int(os.environ.get("MMGRAD_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def kernel_backends() -> list[str]:
    """Kernel backends that run on CPU tensors here (the reference is the oracle, not a subject)."""
    return [n for n, i in mmgrad.backends().items() if i.available and n != "reference" and "cpu" in i.devices]


requires_cpu_kernels = pytest.mark.skipif(
    not mmgrad.backends()["cpu"].available, reason="the C++ extension mmgrad._C is not built"
)
