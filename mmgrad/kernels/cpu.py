"""The ``cpu`` backend: checked Python wrappers around the C++/OpenMP kernels of ``mmgrad._C``.

Same names, signatures and results as ``mmgrad.reference`` (docs/spec.md §6). Reached through
``mmgrad.ops``. ``moo_weights`` is csrc/mmgrad_math.h's solver, the one the GPU backends
run, compiled for the host; the per-group host solves (``mgda_weights``, ...) have no
kernel here and ``mmgrad.ops`` runs them on the reference.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import _validation as V
from .._constants import CONFIDENCE_CODES, WEIGHT_CODES
from .._constants import MOO_MAX_OBJECTIVES as _MOO_MAX_OBJECTIVES
from ..backends import cpu_extension
from ..reference.bogc import ema_weights, finish_output, raw_output
from ..reference.finite import all_finite as exact_all_finite
from . import library  # noqa: F401 - registers the torch.library operators
from . import stats as step_stats

Tensor = torch.Tensor

__all__ = [
    "all_finite",
    "bogc_from_moments",
    "bogc_sample_step",
    "bogc_step",
    "combine",
    "combine_and_gram",
    "ds_combine",
    "ema_moments",
    "gram",
    "moo_weights",
    "opinions",
]
#: the backend's name in ``backend=``
NAME = "cpu"
#: whether a step can run with no value read on the host (``sync_free=True``): the host is the device here
SYNC_FREE = False
#: the most objectives ``moo_weights`` solves (the solver holds a group's Gram in registers)
MOO_MAX_OBJECTIVES = _MOO_MAX_OBJECTIVES



def _extension():
    ext = cpu_extension()
    if ext is None:
        raise RuntimeError("the cpu backend needs the compiled extension mmgrad._C; see mmgrad.backends()")
    return ext


def _kernels():
    """The C++ kernels, as the torch.library operators of ``library.py`` (torch.compile traces them)."""
    _extension()
    return torch.ops.mmgrad


def _kernel_input(name: str, t: object, dim: int) -> Tensor:
    t = V.check_float_tensor(name, t, dim=dim)
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for backend='cpu'; got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for backend='cpu' (call .contiguous() on it)")
    if dim >= 2 and t.shape[-2] > _extension().MAX_OBJECTIVES:
        raise ValueError(f"{name} has M={t.shape[-2]} objectives; the kernels take at most {_extension().MAX_OBJECTIVES}")
    return t


def state_dtypes(g: Tensor) -> Tuple[torch.dtype, ...]:
    """EMA state dtypes the kernels take for gradients like ``g``: the compute dtype, or
    bfloat16 (``state_dtype=torch.bfloat16``) for float32 and half gradients."""
    return (torch.float64,) if g.dtype == torch.float64 else (torch.float32, torch.bfloat16)


def _check_state(name: str, t: Tensor, g: Tensor, like: Optional[Tensor] = None) -> Tensor:
    _kernel_input(name, t, 2)
    want = state_dtypes(g) if like is None else (like.dtype,)
    if t.dtype not in want:
        raise TypeError(f"{name} must be {' or '.join(map(str, want))} (the state dtype{'s' if len(want) > 1 else ''} "
                        f"for {g.dtype} gradients{', as mean' if like is not None else ''}); got {t.dtype}")
    if t.shape != g.shape:
        raise ValueError(f"{name} must have the shape of g {tuple(g.shape)}; got {tuple(t.shape)}")
    return t


def _float_pair(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """Inputs of the element-wise pure functions, promoted to float32/float64 like the reference."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return tuple(t.to(dt).contiguous() for t in tensors)


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """``reference.all_finite`` in one threaded, vectorised read: a finite sum means finite
    entries; only a sum that is not (an inf/NaN entry, or a rare overflow) takes the exact
    check. torch's inf-norm runs on one thread here, 10x slower."""
    tensors = list(tensors)
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return torch.ones((), dtype=torch.bool)
    return exact_all_finite(tensors)


def ema_moments(g: Tensor, mean: Tensor, var: Tensor, step: int, beta: float) -> Tuple[Tensor, Tensor]:
    g = _kernel_input("g", g, 2)
    mean, var = _check_state("mean", mean, g), _check_state("var", var, g)
    step, beta = V.check_step(step), V.check_beta(beta)
    if mean.dtype != (torch.float64 if g.dtype == torch.float64 else torch.float32) or var.dtype != mean.dtype:
        raise TypeError(f"mean and var must be in the compute dtype of g ({g.dtype}) for ema_moments; "
                        f"got {mean.dtype}, {var.dtype}")
    mean_out, var_out = torch.empty_like(mean), torch.empty_like(var)
    _kernels().ema_moments(g, mean, var, mean_out, var_out, step, beta)
    return mean_out, var_out


def opinions(mu: Tensor, var: Tensor, gamma: float, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    mu, var = _kernel_input("mu", mu, 2), _kernel_input("var", var, 2)
    V.check_same_shape(("mu", "var"), (mu, var))
    gamma, eps = V.check_bogc_options(gamma, eps, "belief", "belief")
    mu, var = _float_pair(mu, var)
    lam, b_pos, b_neg, u = (torch.empty_like(mu) for _ in range(4))
    _kernels().opinions(mu, var, lam, b_pos, b_neg, u, gamma, eps)
    return lam, b_pos, b_neg, u


def ds_combine(b_pos: Tensor, b_neg: Tensor, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    for name, t in (("b_pos", b_pos), ("b_neg", b_neg), ("u", u)):
        _kernel_input(name, t, 2)
    V.check_same_shape(("b_pos", "b_neg", "u"), (b_pos, b_neg, u))
    if b_pos.shape[0] < 1:
        raise ValueError("b_pos must hold at least one opinion (M >= 1)")
    b_pos, b_neg, u = _float_pair(b_pos, b_neg, u)
    outs = tuple(torch.empty(b_pos.shape[1], dtype=b_pos.dtype) for _ in range(3))
    _kernels().ds_combine(b_pos, b_neg, u, *outs)
    return outs


def bogc_from_moments(
    mu: Tensor,
    var: Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    confidence: str = "belief",
    weights: str = "belief",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    mu, var = _kernel_input("mu", mu, 2), _kernel_input("var", var, 2)
    V.check_same_shape(("mu", "var"), (mu, var))
    mu, var = _float_pair(mu, var)
    n = mu.shape[1]
    out, fu, fbp, fbn = (torch.empty(n, dtype=mu.dtype) for _ in range(4))
    stats = _kernels().bogc_from_moments(mu, var, out, fu, fbp, fbn, gamma, eps, CONFIDENCE_CODES[confidence], WEIGHT_CODES[weights])
    s = step_stats.parse(stats, mu.shape[0], 1, n)
    return out, {"uncertainty": fu, "belief_pos": fbp, "belief_neg": fbn, "weights": s["weights"], "conflict": s["conflict"]}


def bogc_step(
    g: Tensor,
    mean: Tensor,
    var: Tensor,
    step: int,
    *,
    beta: float = 0.9,
    gamma: float = 1.0,
    eps: float = 1e-8,
    confidence: str = "belief",
    weights: str = "belief",
    rescale: bool = True,
    group_offsets: Optional[Tensor] = None,
    mean_out: Optional[Tensor] = None,
    var_out: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
    """Fused BOGC step: one read of g and the state; writes mean_out, var_out (may alias
    mean, var) and out.

    The state update goes to ``mean_out``/``var_out`` so a caller can keep ``mean``/``var``
    intact when the step turns out to hold non-finite gradients (``stats["nonfinite"] > 0``).
    """
    g = _kernel_input("g", g, 2)
    mean = _check_state("mean", mean, g)
    var = _check_state("var", var, g, like=mean)
    step, beta = V.check_step(step), V.check_beta(beta)
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, g.shape[1])
    mean_out = torch.empty_like(mean) if mean_out is None else _check_state("mean_out", mean_out, g, like=mean)
    var_out = torch.empty_like(var) if var_out is None else _check_state("var_out", var_out, g, like=mean)
    out = V.check_out(out, g, unrounded=True)
    raw = raw_output(out)
    stats = _kernels().bogc_step(g, mean, var, mean_out, var_out, raw, off, step, beta, gamma, eps,
                             CONFIDENCE_CODES[confidence], WEIGHT_CODES[weights])
    s = step_stats.parse(stats, g.shape[0], off.numel() - 1, g.shape[1])
    return finish_output(out, raw, s, rescale), mean_out, var_out, s


def bogc_sample_step(
    samples: Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    confidence: str = "belief",
    weights: str = "belief",
    rescale: bool = True,
    group_offsets: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    samples = _kernel_input("samples", samples, 3)
    if samples.shape[0] < 2:
        raise ValueError(f"samples needs S >= 2 along dim 0 for an unbiased variance; got S={samples.shape[0]}")
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, samples.shape[2])
    out = V.check_out(out, samples, unrounded=True)
    raw = raw_output(out)
    stats = _kernels().bogc_sample_step(samples, raw, off, gamma, eps, CONFIDENCE_CODES[confidence], WEIGHT_CODES[weights])
    s = step_stats.parse(stats, samples.shape[1], off.numel() - 1, samples.shape[2])
    return finish_output(out, raw, s, rescale), s


def gram(g: Tensor, *, group_offsets: Optional[Tensor] = None) -> Tensor:
    g = _kernel_input("g", g, 2)
    off = V.check_group_offsets(group_offsets, g.shape[1])
    m, groups = g.shape[0], off.numel() - 1
    k = _kernels().gram(g, off)[: groups * m * m].view(groups, m, m)
    return k[0] if group_offsets is None else k


def combine(g: Tensor, alpha: Tensor, *, group_offsets: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    out, _ = combine_and_gram(g, alpha, group_offsets=group_offsets, out=out, with_gram=False)
    return out


def combine_and_gram(
    g: Tensor,
    alpha: Tensor,
    *,
    group_offsets: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    with_gram: bool = True,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``combine`` that also returns the non-finite count and (``with_gram``) the per-group
    Gram from the same read (lagged MOO)."""
    g = _kernel_input("g", g, 2)
    V.check_float_tensor("alpha", alpha)
    off = V.check_group_offsets(group_offsets, g.shape[1])
    m, groups = g.shape[0], off.numel() - 1
    want = (m,) if group_offsets is None else (groups, m)
    if tuple(alpha.shape) != want:
        raise ValueError(f"alpha must have shape {want}; got {tuple(alpha.shape)}")
    a = alpha.detach().to("cpu", torch.float64).reshape(groups, m).contiguous()
    out = V.check_out(out, g)
    stats = _kernels().combine(g, a, off, out, with_gram)
    res = {"nonfinite": stats[-1].to(torch.int64)}
    if with_gram:
        res["gram"] = stats[: groups * m * m].view(groups, m, m)
    return out, res


def moo_weights(grams: Tensor, method: str, *, normalize: str = "none", losses=None, magnitude: float = 1.5) -> Tensor:
    """The reference's ``moo_weights`` by csrc/mmgrad_math.h's interior-point solver (the
    GPU backends' solver, docs/solver.md), for M <= 16 objectives."""
    grams = V.check_float_tensor("grams", grams, dim=3)
    if grams.device.type != "cpu":
        raise ValueError(f"grams must be a CPU tensor for backend='cpu'; got one on {grams.device}")
    codes = V.check_moo_call("cpu", grams, method, normalize, losses, magnitude)
    return _extension().moo_weights_device(grams.to(torch.float64).contiguous(), *codes)
