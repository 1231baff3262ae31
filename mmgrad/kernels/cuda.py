"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda`` through ``mmgrad._C_cuda``.

Built only where torch has CUDA (setup.py says when it skips). The element math and the
MOO solver are ``csrc/mmgrad_math.h``, the functions the CPU build runs and the CPU tests
check; this project's CI compiles the kernels and the binding but has no GPU to run them
on (README, "Backends"). The checked Python side is ``gpu_ops.GpuOps``, shared with the
triton backend; here are only the launches. Nothing reads a value back to the host.
"""

from __future__ import annotations

import torch

from .. import _validation as V
from ..backends import cuda_extension
from ..reference.finite import all_finite  # noqa: F401
from ..reference.bogc import bogc_from_moments, ds_combine, ema_moments, opinions  # noqa: F401
from ..reference.moo import mgda_weights, mimo_weights, mmpareto_weights  # noqa: F401
from .gpu_ops import GpuOps

Tensor = torch.Tensor

__all__ = [  # the same functions as every backend; the element-wise ones are the reference's
    "all_finite", "bogc_from_moments", "bogc_sample_step", "bogc_step", "combine", "combine_and_gram",
    "ds_combine", "ema_moments", "gram", "mgda_weights", "mimo_weights", "mmpareto_weights", "moo_weights", "opinions",
]

_CONFIDENCE = {name: i for i, name in enumerate(V.CONFIDENCE_MODES)}
_WEIGHTS = {name: i for i, name in enumerate(V.WEIGHT_MODES)}


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("the cuda backend needs mmgrad._C_cuda, built only where torch has CUDA; see mmgrad.backends()")
    return ext


def _partials(off: Tensor, n: int, width: int, device: torch.device) -> Tensor:
    """Per-block partials, as many blocks as the binding launches (grid-stride beyond)."""
    blocks = _ext().blocks_for(n, _ext().THREADS)
    return torch.zeros(off.numel() - 1, blocks, width, dtype=torch.float64, device=device)


def _launch_bogc(g, mean_in, var_in, mean_out, var_out, raw, off, samples, alpha, commit, gamma, eps, confidence, weights):
    # the commit-gated step of sync_free=True is the triton backend's (README, "Backends")
    if commit is not None:
        raise ValueError("backend='cuda' has no commit-gated BOGC step; sync_free=True needs backend='triton'")
    mm, n = g.shape[-2], g.shape[-1]
    parts = _partials(off, n, 6 + mm + mm * mm, g.device)
    _ext().bogc_step(g, mean_in, var_in, mean_out, var_out, raw, off, samples, *alpha, gamma, eps,
                     _CONFIDENCE[confidence], _WEIGHTS[weights], parts)
    return parts


def _launch_combine(g, alpha, out, off, with_gram):
    mm, n = g.shape
    parts = _partials(off, n, mm * mm + 1, g.device)
    _ext().combine_and_gram(g, alpha, out, off, with_gram, parts)
    return parts


def _launch_moo(grams, method, normalize, losses, magnitude):
    return _ext().moo_weights(grams, method, normalize, losses, magnitude)


_OPS = GpuOps("cuda", lambda device: device.type == "cuda", _launch_bogc, _launch_combine, _launch_moo)
bogc_step = _OPS.bogc_step
bogc_sample_step = _OPS.bogc_sample_step
combine_and_gram = _OPS.combine_and_gram
combine = _OPS.combine
gram = _OPS.gram
moo_weights = _OPS.moo_weights
