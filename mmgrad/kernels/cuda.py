"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda`` through ``mmgrad._C_cuda``.

Built only where torch has CUDA (setup.py says when it skips). The element math and the
MOO solver are ``csrc/mmgrad_math.h``, the functions the CPU build runs and the CPU tests
check; this project's CI compiles the kernels and the binding but has no GPU to run them
on (docs/backends.md). The checked Python side is ``gpu_ops.GpuOps``, shared with the
triton backend; here are only the launches. Nothing reads a value back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .._constants import CONFIDENCE_CODES, WEIGHT_CODES
from .._constants import MOO_MAX_OBJECTIVES as _MOO_MAX_OBJECTIVES
from ..backends import cuda_extension
from ..reference.finite import all_finite  # noqa: F401 - torch's fused multi-tensor max-norm: one launch
from .gpu_ops import GpuOps

Tensor = torch.Tensor

#: what this backend computes in its own kernels (mmgrad.ops runs the rest on the reference)
__all__ = ["all_finite", "bogc_sample_step", "bogc_step", "combine", "combine_and_gram", "gram", "moo_weights"]
#: the backend's name in ``backend=``
NAME = "cuda"
#: whether a step can run with no value read on the host (``sync_free=True``): not yet here
SYNC_FREE = False
#: the most objectives ``moo_weights`` solves (the solver holds a group's Gram in registers)
MOO_MAX_OBJECTIVES = _MOO_MAX_OBJECTIVES


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("the cuda backend needs mmgrad._C_cuda, built only where torch has CUDA; see mmgrad.backends()")
    return ext


def _partials(group_offsets: Tensor, n: int, width: int, device: torch.device) -> Tensor:
    """Per-block partials, as many blocks as the binding launches (grid-stride beyond)."""
    blocks = _ext().blocks_for(n, _ext().THREADS)
    return torch.zeros(group_offsets.numel() - 1, blocks, width, dtype=torch.float64, device=device)


# The launches as torch.library operators (opaque to torch.compile, with fakes for its
# tracing; tests/test_gpu.py opchecks them on a GPU). The host-driven step only: the
# commit-gated one of sync_free=True is the triton backend's.
@torch.library.custom_op("mmgrad::cuda_bogc", mutates_args={"mean_out", "var_out", "raw"}, device_types="cuda")
def _bogc_op(g: Tensor, mean_in: Tensor, var_in: Tensor, mean_out: Tensor, var_out: Tensor, raw: Tensor,
             group_offsets: Tensor, samples: int, alpha: float, one_minus_alpha: float, gamma: float, eps: float,
             confidence: int, weights: int) -> Tensor:
    """One BOGC step over every group; returns the partials ``G x blocks x [6 | M | M*M]``."""
    parts = _partials(group_offsets, g.shape[-1], 6 + g.shape[-2] * (g.shape[-2] + 1), g.device)
    _ext().bogc_step(g, mean_in, var_in, mean_out, var_out, raw, group_offsets, samples, alpha, one_minus_alpha,
                     gamma, eps, confidence, weights, parts)
    return parts


@_bogc_op.register_fake
def _(g, mean_in, var_in, mean_out, var_out, raw, group_offsets, *rest):
    return _partials(group_offsets, g.shape[-1], 6 + g.shape[-2] * (g.shape[-2] + 1), g.device)


@torch.library.custom_op("mmgrad::cuda_combine", mutates_args={"out"}, device_types="cuda")
def _combine_op(g: Tensor, alpha: Optional[Tensor], out: Tensor, group_offsets: Tensor, with_gram: bool) -> Tensor:
    """``out = alpha_G^T g`` per group (without ``alpha``: the Gram alone, ``out`` unused; a
    mutable argument may not be None under torch.compile); partials ``G x blocks x [M*M | 1]``."""
    parts = _partials(group_offsets, g.shape[1], g.shape[0] ** 2 + 1, g.device)
    _ext().combine_and_gram(g, alpha, None if alpha is None else out, group_offsets, with_gram, parts)
    return parts


@_combine_op.register_fake
def _(g, alpha, out, group_offsets, with_gram):
    return _partials(group_offsets, g.shape[1], g.shape[0] ** 2 + 1, g.device)


@torch.library.custom_op("mmgrad::cuda_moo_weights", mutates_args=(), device_types="cuda")
def _moo_op(grams: Tensor, method: int, normalize: int, losses: Tensor, magnitude: float) -> Tensor:
    """The ``G x M`` MOO weights (method code as in ``MOO_METHODS``), one block per group."""
    return _ext().moo_weights(grams, method, normalize, losses, magnitude)


@_moo_op.register_fake
def _(grams, method, normalize, losses, magnitude):
    return grams.new_empty(grams.shape[0], grams.shape[1])


def _launch_bogc(g, mean_in, var_in, mean_out, var_out, raw, off, samples, alpha, commit, gamma, eps, confidence, weights):
    if commit is not None:
        raise ValueError("backend='cuda' has no commit-gated BOGC step; sync_free=True needs backend='triton'")
    return torch.ops.mmgrad.cuda_bogc(g, mean_in, var_in, mean_out, var_out, raw, off, samples, float(alpha[0]),
                                      float(alpha[1]), gamma, eps, CONFIDENCE_CODES[confidence], WEIGHT_CODES[weights])


def _launch_combine(g, alpha, out, off, with_gram):
    return torch.ops.mmgrad.cuda_combine(g, alpha, g.new_empty(0) if out is None else out, off, with_gram)


def _launch_moo(grams, method, normalize, losses, magnitude):
    return torch.ops.mmgrad.cuda_moo_weights(grams, method, normalize, losses, magnitude)


_OPS = GpuOps("cuda", lambda device: device.type == "cuda", _launch_bogc, _launch_combine, _launch_moo)
bogc_step = _OPS.bogc_step
bogc_sample_step = _OPS.bogc_sample_step
combine_and_gram = _OPS.combine_and_gram
combine = _OPS.combine
gram = _OPS.gram
moo_weights = _OPS.moo_weights
