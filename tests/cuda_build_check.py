"""What a GPU user's install gives, checked on a machine without a GPU (``make cuda-build``).

Run with the python of an environment holding CUDA torch (torch==2.14.1, CUDA 13.0) and
mmgrad installed by ``pip install --no-build-isolation .``, from outside the source tree
(so ``import mmgrad`` is the installed package): imports ``mmgrad._C_cuda``, asks
``mmgrad.backends()`` what it sees, and runs every binding's argument checks on CPU
tensors. Exits non-zero on any failure.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Tuple

import torch


def expect(errors: Tuple[type, ...], match: str, fn: Callable[[], object]) -> str:
    try:
        fn()
    except errors as err:
        if match not in str(err):
            raise AssertionError(f"expected {match!r} in the error; got {err}") from err
        return str(err).splitlines()[0]
    raise AssertionError(f"expected {errors} matching {match!r}; nothing was raised")


def main() -> int:
    import mmgrad
    from mmgrad import _C_cuda as ext
    from mmgrad.kernels import cuda

    assert "site-packages" in mmgrad.__file__, f"mmgrad must be the installed package, got {mmgrad.__file__}"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); mmgrad from {mmgrad.__file__}")
    print(f"mmgrad._C_cuda: {ext.__file__}")
    info = mmgrad.backends()["cuda"]
    print(f"backends()['cuda']: {info}")
    checks: List[Tuple[str, Callable[[], str]]] = []
    g, z = torch.randn(2, 8), torch.zeros(2, 8)
    off = torch.tensor([0, 8])
    parts = torch.zeros(1, 1, 6 + 2 + 4, dtype=torch.float64)
    checks += [
        ("bogc_step on CPU tensors", lambda: expect((ValueError,), "g must be a CUDA tensor", lambda: ext.bogc_step(
            g, z, z, z, z, torch.zeros(8), off, 0, 1.0, 0.0, 1.0, 1e-8, 0, 0, parts))),
        ("combine_and_gram on CPU tensors", lambda: expect((ValueError,), "g must be a CUDA tensor", lambda: ext.combine_and_gram(
            g, torch.ones(1, 2, dtype=torch.float64), torch.zeros(8), off, True, torch.zeros(1, 1, 5, dtype=torch.float64)))),
        ("moo_weights on CPU tensors", lambda: expect((ValueError,), "grams must be a CUDA tensor", lambda: ext.moo_weights(
            torch.eye(2, dtype=torch.float64)[None], 0, 0, torch.ones(2, dtype=torch.float64), 1.5))),
        ("blocks_for without a device", lambda: expect((RuntimeError,), "mmgrad CUDA launch failed", lambda: ext.blocks_for(1000, 256))),
        ("backend='cuda' without a device", lambda: expect((ValueError,), "no CUDA device is visible", lambda: mmgrad.ops.gram(g, backend="cuda"))),
        ("cuda.gram on CPU tensors", lambda: expect((ValueError,), "g must be a CUDA tensor for backend='cuda'", lambda: cuda.gram(g))),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"  ok   {name}: {check()}")
        except AssertionError as err:
            failed += 1
            print(f"  FAIL {name}: {err}")
    if info.available or "no CUDA device" not in info.reason:
        failed += 1
        print(f"  FAIL backends()['cuda'] should load the extension and say no device is visible; it says {info}")
    print(f"cuda-build: mmgrad._C_cuda built, linked and imported against torch {torch.__version__}; "
          f"{len(checks) - failed} of {len(checks)} binding checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
