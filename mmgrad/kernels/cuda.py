"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda`` through ``mmgrad._C_cuda``.

Built only where torch has CUDA (setup.py says when it skips). The element math is
``csrc/mmgrad_math.h``, the same functions the CPU build runs and the CPU tests check;
this project's CI compiles the kernels with nvcc but has no GPU to run them on (README,
"Backends"). Partial statistics are reduced on the device, the MOO weights are solved
by a one-block kernel, and nothing here reads a value back to the host.
"""

from __future__ import annotations

from typing import Dict

import torch

from .. import _validation as V
from ..backends import cuda_extension
from ..reference.bogc import bogc_from_moments, ds_combine, ema_moments, finish_output, opinions, raw_output  # noqa: F401
from ..reference.moo import MOO_METHODS, mgda_weights, mimo_weights, mmpareto_weights  # noqa: F401
from .cpu import stats_from_block_partials

Tensor = torch.Tensor

__all__ = [  # the same functions as every backend; the element-wise ones are the reference's
    "bogc_from_moments", "bogc_sample_step", "bogc_step", "bogc_step_slots", "combine", "combine_and_gram",
    "ds_combine", "ema_moments", "gram", "mgda_weights", "mimo_weights", "mmpareto_weights", "moo_weights", "opinions",
]

_CONFIDENCE = {name: i for i, name in enumerate(V.CONFIDENCE_MODES)}
_WEIGHTS = {name: i for i, name in enumerate(V.WEIGHT_MODES)}
_NORMALIZE = {"none": 0, "l2": 1, "loss": 2}
MOO_MAX_OBJECTIVES = 16


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("the cuda backend needs mmgrad._C_cuda, built only where torch has CUDA; see mmgrad.backends()")
    return ext


def _check(name: str, t: object, dim: int, contiguous: bool = True) -> Tensor:
    t = V.check_float_tensor(name, t, dim=dim)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for backend='cuda' (call .contiguous() on it)")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for backend='cuda'; got one on {t.device}")
    return t


def _partials(groups: int, n: int, width: int, device: torch.device) -> Tensor:
    blocks = _ext().blocks_for(n, _ext().THREADS)
    return torch.zeros(groups, blocks, width, dtype=torch.float64, device=device)


def _bogc(g, m_in, v_in, m_out, v_out, raw, off, samples, beta, ibc, slot, ibc_device, gamma, eps, confidence, weights):
    mm, n = g.shape[-2], g.shape[-1]
    groups = off.numel() - 1
    parts = _partials(groups, n, 6 + mm + mm * mm, g.device)
    _ext().bogc_step(g, m_in, v_in, m_out, v_out, raw, off, slot, ibc_device, samples, beta, ibc, gamma, eps,
                     _CONFIDENCE[confidence], _WEIGHTS[weights], parts)
    return stats_from_block_partials(parts, mm, groups, n)


def _state(name: str, t: object, like: Tensor) -> Tensor:
    t = _check(name, t, like.dim())
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be torch.float32 for backend='cuda'; got {t.dtype}")
    return t


def bogc_step(g, m, v, step, *, beta=0.9, gamma=1.0, eps=1e-8, confidence="belief", weights="belief",
              rescale=True, group_offsets=None, m_out=None, v_out=None, out=None):
    g = _check("g", g, 2)
    m, v = _state("m", m, g), _state("v", v, g)
    V.check_same_shape(("g", "m", "v"), (g, m, v))
    step, beta = V.check_step(step), V.check_beta(beta)
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, g.shape[1])
    m_out = torch.empty_like(m) if m_out is None else _state("m_out", m_out, g)
    v_out = torch.empty_like(v) if v_out is None else _state("v_out", v_out, g)
    out = torch.empty(g.shape[1], dtype=g.dtype, device=g.device) if out is None else out
    raw = raw_output(out)
    st = _bogc(g, m, v, m_out, v_out, raw, off, 0, beta, 1.0 / (1.0 - beta**step), None, None, gamma, eps, confidence, weights)
    return finish_output(out, raw, st, rescale), m_out, v_out, st


def bogc_step_slots(g, m_state, v_state, slot, step, *, beta=0.9, gamma=1.0, eps=1e-8, confidence="belief",
                    weights="belief", rescale=True, group_offsets=None, out=None):
    """As the triton backend's: double-buffered state, device slot and step (sync-free)."""
    g = _check("g", g, 2)
    m_state, v_state = _state("m_state", m_state, m_state), _state("v_state", v_state, v_state)
    if m_state.shape != (2, *g.shape) or v_state.shape != m_state.shape:
        raise ValueError(f"m_state and v_state must have shape (2, {g.shape[0]}, {g.shape[1]})")
    beta = V.check_beta(beta)
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, g.shape[1])
    out = torch.empty(g.shape[1], dtype=g.dtype, device=g.device) if out is None else out
    raw = raw_output(out)
    ibc = (1.0 / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=g.device), step.to(torch.float64)))).reshape(())
    st = _bogc(g, m_state[0], v_state[0], m_state[1], v_state[1], raw, off, 0, beta, 1.0, slot.reshape(()), ibc,
               gamma, eps, confidence, weights)
    return finish_output(out, raw, st, rescale), st


def bogc_sample_step(samples, *, gamma=1.0, eps=1e-8, confidence="belief", weights="belief",
                     rescale=True, group_offsets=None, out=None):
    samples = _check("samples", samples, 3)
    if samples.shape[0] < 2:
        raise ValueError(f"samples needs S >= 2 along dim 0 for an unbiased variance; got S={samples.shape[0]}")
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, samples.shape[2])
    out = torch.empty(samples.shape[2], dtype=samples.dtype, device=samples.device) if out is None else out
    raw = raw_output(out)
    dummy = torch.empty(0, dtype=torch.float32, device=samples.device)
    st = _bogc(samples, dummy, dummy, dummy, dummy, raw, off, samples.shape[0], 0.0, 1.0, None, None,
               gamma, eps, confidence, weights)
    return finish_output(out, raw, st, rescale), st


def combine_and_gram(g, alpha, *, group_offsets=None, out=None, with_gram=True, _with_out=True):
    g = _check("g", g, 2)
    V.check_float_tensor("alpha", alpha)
    mm, n = g.shape
    off = V.check_group_offsets(group_offsets, n)
    groups = off.numel() - 1
    want = (mm,) if group_offsets is None else (groups, mm)
    if tuple(alpha.shape) != want:
        raise ValueError(f"alpha must have shape {want}; got {tuple(alpha.shape)}")
    a = alpha.detach().to(g.device, torch.float64).reshape(groups, mm).contiguous()
    out = torch.empty(n, dtype=g.dtype, device=g.device) if out is None else out
    parts = _partials(groups, n, mm * mm + 1, g.device)
    _ext().combine_and_gram(g, a if _with_out else None, out if _with_out else None, off, with_gram, parts)
    tot = parts.sum(dim=1)
    res: Dict[str, Tensor] = {"nonfinite": tot[:, -1].sum().to(torch.int64)}
    if with_gram:
        res["gram"] = tot[:, :-1].reshape(groups, mm, mm)
    return out, res


def combine(g, alpha, *, group_offsets=None, out=None):
    return combine_and_gram(g, alpha, group_offsets=group_offsets, out=out, with_gram=False)[0]


def gram(g, *, group_offsets=None):
    g = _check("g", g, 2)
    groups = 1 if group_offsets is None else V.check_group_offsets(group_offsets, g.shape[1]).numel() - 1
    zeros = torch.zeros((g.shape[0],) if group_offsets is None else (groups, g.shape[0]), dtype=torch.float64, device=g.device)
    _, st = combine_and_gram(g, zeros, group_offsets=group_offsets, with_gram=True, _with_out=False)
    return st["gram"][0] if group_offsets is None else st["gram"]


def moo_weights(grams, method, *, normalize="none", losses=None, magnitude=1.5):
    """The one-block solver of mmgrad_math.h (the triton backend's algorithm); no sync."""
    V.check_choice("method", method, MOO_METHODS)
    V.check_choice("normalize", normalize, V.MGDA_NORMALIZATIONS)
    magnitude = V.check_positive("magnitude", magnitude)
    grams = _check("grams", grams, 3, contiguous=False)
    mm = grams.shape[1]
    if grams.shape[2] != mm or mm > MOO_MAX_OBJECTIVES:
        raise ValueError(f"grams must be G x M x M with M <= {MOO_MAX_OBJECTIVES}; got shape {tuple(grams.shape)}")
    if normalize == "loss" and losses is None:
        raise ValueError('losses must be given when normalize="loss"')
    loss_t = (torch.as_tensor(losses, dtype=torch.float64, device=grams.device).reshape(-1) if normalize == "loss"
              else torch.ones(mm, dtype=torch.float64, device=grams.device))
    return _ext().moo_weights(grams.to(torch.float64).contiguous(), MOO_METHODS.index(method), _NORMALIZE[normalize],
                              loss_t.contiguous(), float(magnitude))
