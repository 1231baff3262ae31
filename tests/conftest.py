"""Shared fixtures: fresh random inputs each run (the seed is printed on failure)."""

from __future__ import annotations

import os
import random

# Triton's interpreter for the whole suite, set before any test module imports Triton (which
# reads it when a kernel is defined): the triton backend then runs on CPU tensors in every
# module, whatever the collection order. An explicit value wins: make device-check runs
# tests/test_gpu.py with TRITON_INTERPRET=0, on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mmgrad  # noqa: E402


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded afresh per test; rerun a failure with MMGRAD_TEST_SEED=<seed>."""
    seed = int(os.environ.get("MMGRAD_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test``), each worker's torch threads get its share of the
    cores: N workers of all-core threads on N cores would slow one another."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_addoption(parser) -> None:
    parser.addoption("--shuffle", type=int, default=None, metavar="SEED",
                     help="run the test modules, and the tests in each, in an order shuffled by SEED "
                          "(0: a fresh seed, printed); `make random-order` uses it")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that draw from ``gen`` are ``randomized``: ``make flake-hunt`` reruns them.
    With ``--shuffle``, the order of modules and of the tests in each is shuffled."""
    for item in items:
        if "gen" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.randomized)
    seed = getattr(config, "shuffle_seed", None)
    if seed is None:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # also under -q, which prints no header
        reporter.write_line(f"test order shuffled with --shuffle {seed}")
    rng = random.Random(seed)
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module.__name__ if item.module else "", []).append(item)
    order = list(modules)
    rng.shuffle(order)
    items[:] = [it for name in order for it in rng.sample(modules[name], len(modules[name]))]


def pytest_configure(config) -> None:
    seed = config.getoption("--shuffle", default=None)
    if seed is not None:
        config.shuffle_seed = seed or int.from_bytes(os.urandom(4), "little")




def builtin_methods() -> list[str]:
    """mmgrad's own methods (a test may register a toy Weighting of its own)."""
    return list(mmgrad.methods.BUILTIN)


def kernel_backends() -> list[str]:
    """Kernel backends that run on CPU tensors here (the reference is the oracle, not a subject)."""
    return [n for n, i in mmgrad.backends().items() if i.available and n != "reference" and "cpu" in i.devices]


requires_cpu_kernels = pytest.mark.skipif(
    not mmgrad.backends()["cpu"].available, reason="the C++ extension mmgrad._C is not built"
)


def assert_bit_identical(a, b, where: str = "") -> None:
    """Tensors, and lists/dicts/tuples of them, equal bit for bit (NaN payloads aside)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def tensor_offsets(params) -> torch.Tensor:
    """Offsets of each parameter's range in the flat, given-order buffer."""
    return torch.tensor([0, *torch.tensor([p.numel() for p in params]).cumsum(0).tolist()], dtype=torch.int64)


def mmpareto_oracle(g: torch.Tensor, offsets: torch.Tensor, group_of, magnitude: float = 1.5):
    """MMPareto's official step in float64 on the dense rows ``g`` (M x N, parameters in
    order at ``offsets``): the reference's per-tensor weights, combined per tensor.
    Returns (output, weights)."""
    from mmgrad import reference as R

    w = R.mmpareto_tensor_weights(R.gram(g, group_offsets=offsets), list(group_of), magnitude)
    return R.combine(g, w, group_offsets=offsets), w
