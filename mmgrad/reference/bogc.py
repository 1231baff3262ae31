"""BOGC in plain PyTorch: the oracle every kernel is tested against (docs/spec.md §3).

Written for clarity, not speed: each step of the spec is one line or two, in any float
dtype (float64 for the oracle) on any device. The fused kernels compute the same
function in one pass; ``bogc_step`` here is their reference.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .. import _validation as V

# Evidence is clamped to EVIDENCE_MAX so that every opinion keeps u > 0 in float32: the
# Dempster-Shafer fold then never divides 0 by 0 (mmgrad's choice; docs/spec.md, §9).
from .._constants import EVIDENCE_MAX

Tensor = torch.Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def ema_weights(step, beta: float):
    """The EMA's weight of update ``step`` (1 on the first): ``(alpha, 1 - alpha)`` with
    ``alpha = (1-beta)/(1-beta**step)``, each formed without cancellation, in float64.

    ``step`` is an int (Python floats back) or a device tensor (tensors back, no host
    synchronisation). Every backend takes its weights from here.

    >>> ema_weights(1, 0.9)
    (1.0, 0.0)
    """
    if isinstance(step, torch.Tensor):
        step = step.to(torch.float64)
    bias = 1.0 - beta**step
    # 1 - alpha as beta(1 - beta^(t-1))/(1 - beta^t): 1 - alpha itself cancels when beta is small
    return (1.0 - beta) / bias, beta * (1.0 - beta ** (step - 1)) / bias


def ema_moments(g: Tensor, mean: Tensor, var: Tensor, step: int, beta: float) -> Tuple[Tensor, Tensor]:
    """EMA estimator of docs/spec.md §3.1: returns the updated state ``(mean, var)``.

    The state is the bias-corrected mean and the variance themselves, not the raw moments ``m, v``
    (docs/spec.md, decision 3): with ``alpha, 1 - alpha = ema_weights(step, beta)`` and
    ``d = g - mean``, ``mean' = mean + alpha d`` and ``var' = (1 - alpha)(var + alpha d^2)``,
    which is the moments' ``v/(1-beta**step) - (m/(1-beta**step))**2`` for ``mean, var`` formed
    from ``m, v`` the same way (``state_from_moments``), summed from non-negative terms
    only. ``step`` counts updates including this one. Inputs are not modified.

    >>> g = torch.tensor([[1.0, -2.0]]); z = torch.zeros(1, 2)
    >>> mean, var = ema_moments(g, z, z, step=1, beta=0.9)
    >>> mean, var
    (tensor([[ 1., -2.]]), tensor([[0., 0.]]))
    """
    V.check_float_tensor("g", g, dim=2)
    V.check_float_tensor("mean", mean, dim=2)
    V.check_float_tensor("var", var, dim=2)
    V.check_same_shape(("g", "mean", "var"), (g, mean, var))
    step, beta = V.check_step(step), V.check_beta(beta)
    dt = _compute_dtype(g, mean, var)
    alpha, one_minus_alpha = ema_weights(step, beta)
    g, mean, var = g.to(dt), mean.to(dt), var.to(dt)
    d = g - mean
    ad = alpha * d
    # as mmgrad_math.h: (1-alpha)*alpha*d first, so step 1 gives 0 even where d*d overflows
    return mean + ad, one_minus_alpha * var + (one_minus_alpha * ad) * d


def state_from_moments(m: Tensor, v: Tensor, step: int, beta: float) -> Tuple[Tensor, Tensor]:
    """docs/spec.md §3.1's raw moments ``m, v`` after ``step`` updates as ``ema_moments``' state:
    ``mean = m/(1-beta**step)``, ``var = max(v/(1-beta**step) - mean**2, 0)``, in float64
    (how checkpoints of mmgrad 0.2 and earlier load). ``step = 0``: zero state."""
    m, v = m.double(), v.double()
    if step == 0:
        return torch.zeros_like(m), torch.zeros_like(v)
    bias = 1.0 - beta**step
    mean = m / bias
    return mean, torch.clamp_min(v / bias - mean * mean, 0.0)


def sample_moments(samples: Tensor) -> Tuple[Tensor, Tensor]:
    """Sample estimator of docs/spec.md §3.1: mean and unbiased variance over S >= 2 samples.

    ``samples`` is ``S x M x N``; returns ``(mu, var)``, each ``M x N``.
    """
    V.check_float_tensor("samples", samples, dim=3)
    if samples.shape[0] < 2:
        raise ValueError(f"samples needs S >= 2 along dim 0 for an unbiased variance; got S={samples.shape[0]}")
    x = samples.to(_compute_dtype(samples))
    mu = x.mean(dim=0)
    var = ((x - mu) ** 2).sum(dim=0) / (x.shape[0] - 1)
    return mu, var


def opinions(mu: Tensor, var: Tensor, gamma: float, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Precision, evidence and the binomial opinion on sign(g) (docs/spec.md §3.2-3.4).

    Returns ``(lam, b_pos, b_neg, u)``, each ``M x N``. Where the objective does not
    reach a coordinate (``mu == 0`` and ``var == 0``), ``lam = 0`` and ``u = 1``.
    """
    V.check_float_tensor("mu", mu, dim=2)
    V.check_float_tensor("var", var, dim=2)
    V.check_same_shape(("mu", "var"), (mu, var))
    gamma, eps = V.check_bogc_options(gamma, eps, "belief", "belief")
    dt = _compute_dtype(mu, var)
    mu, var = mu.to(dt), var.to(dt)
    reaches = (mu != 0) | (var != 0)
    lam = torch.where(reaches, 1.0 / (var + eps), torch.zeros_like(var))
    evidence = torch.clamp_max(gamma * ((lam * mu) * mu), EVIDENCE_MAX)  # not mu^2: it overflows float32
    strength = evidence + 2.0
    belief = evidence / strength
    zero = torch.zeros_like(belief)
    b_pos = torch.where(mu > 0, belief, zero)
    b_neg = torch.where(mu < 0, belief, zero)
    u = 2.0 / strength
    return lam, b_pos, b_neg, u


def _ds_fold(b_pos: Tensor, b_neg: Tensor, u: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold M opinions left to right; also returns the total conflict mass per d."""
    # In float64 whatever the dtype, as the kernels do: the fused u of confident objectives
    # is a product of u ~ 2e-30 each, below float32's range (docs/spec.md, §9).
    dt = b_pos.dtype
    b_pos, b_neg, u = b_pos.double(), b_neg.double(), u.double()
    bp, bn, uu = b_pos[0], b_neg[0], u[0]
    kept = torch.ones_like(uu)
    for k in range(1, b_pos.shape[0]):
        # Unnormalised masses; their sum is 1 - C without ever forming 1 - C (docs/spec.md §3.5).
        p = bp * b_pos[k] + bp * u[k] + b_pos[k] * uu
        n = bn * b_neg[k] + bn * u[k] + b_neg[k] * uu
        w = uu * u[k]
        s = p + n + w
        # s == 0 only for two dogmatic (u = 0) opposite opinions: total conflict
        # leaves no information, so the result is vacuous (mmgrad's choice).
        total = s == 0
        inv = torch.where(total, torch.zeros_like(s), 1.0 / torch.where(total, torch.ones_like(s), s))
        bp, bn = p * inv, n * inv
        uu = torch.where(total, torch.ones_like(s), uu * (u[k] * inv))  # not w * inv: w underflows float32
        kept = kept * s
    return bp.to(dt), bn.to(dt), uu.to(dt), (1.0 - kept).to(dt)


def ds_combine(b_pos: Tensor, b_neg: Tensor, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Reduced Dempster-Shafer combination of M opinions (TMC's rule), docs/spec.md §3.5.

    Each input is ``M x N`` (each opinion sums to 1 over ``b_pos + b_neg + u``);
    returns the fused ``(b_pos, b_neg, u)``, each ``N``.

    >>> bp, bn, u = ds_combine(torch.tensor([[0.8], [0.0]]), torch.tensor([[0.0], [0.8]]),
    ...                        torch.tensor([[0.2], [0.2]]))
    >>> float(bp - bn)
    0.0
    """
    for name, t in (("b_pos", b_pos), ("b_neg", b_neg), ("u", u)):
        V.check_float_tensor(name, t, dim=2)
    V.check_same_shape(("b_pos", "b_neg", "u"), (b_pos, b_neg, u))
    if b_pos.shape[0] < 1:
        raise ValueError("b_pos must hold at least one opinion (M >= 1)")
    dt = _compute_dtype(b_pos, b_neg, u)
    bp, bn, uu, _ = _ds_fold(b_pos.to(dt), b_neg.to(dt), u.to(dt))
    return bp, bn, uu


def bogc_from_moments(
    mu: Tensor,
    var: Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    confidence: str = "belief",
    weights: str = "belief",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Calibrated gradient from per-objective means and variances (docs/spec.md §3.2-3.6).

    Returns ``(out, diagnostics)`` with ``out`` of length N (not norm-matched: that is
    the step's job, docs/spec.md §3.7) and the diagnostics ``uncertainty``, ``belief_pos``,
    ``belief_neg`` (each N), ``weights`` (M, mean share of each objective where any
    weight is non-zero) and ``conflict`` (mean conflict mass).

    >>> mu = torch.tensor([[1.0, 2.0], [1.0, -2.0]], dtype=torch.float64)
    >>> out, diag = bogc_from_moments(mu, torch.zeros_like(mu), confidence="none")
    >>> out.tolist()  # equal weights: the plain sum
    [2.0, 0.0]
    """
    out, diagnostics, _ = _bogc_core(mu, var, gamma, eps, confidence, weights)
    return out, diagnostics


def _bogc_core(mu, var, gamma, eps, confidence, weights):
    """``bogc_from_moments`` plus the unnormalised shares ``(share_sum (M), share_count)``,
    which let a caller merge the weights of several segments."""
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    lam, b_pos, b_neg, u = opinions(mu, var, gamma, eps)
    mu = mu.to(lam.dtype)
    fb_pos, fb_neg, fu, conflict = _ds_fold(b_pos, b_neg, u)

    reaches = lam > 0
    n_reach = reaches.sum(dim=0).to(lam.dtype)
    w = (b_pos + b_neg) if weights == "belief" else lam  # b = 1 - u, formed without cancellation
    w_sum = w.sum(dim=0)
    positive = w_sum > 0
    # w / sum(w), not w * (1/sum(w)): the reciprocal of a subnormal sum overflows
    share = torch.where(positive, w / torch.where(positive, w_sum, torch.ones_like(w_sum)), torch.zeros_like(w))
    mu_fused = n_reach * (share * mu).sum(dim=0)

    if confidence == "belief":
        scale = (fb_pos - fb_neg).abs()
    elif confidence == "certainty":
        scale = fb_pos + fb_neg  # = 1 - u, without cancellation when u ~ 1
    else:
        scale = torch.ones_like(fu)
    out = scale * mu_fused

    n_pos = positive.sum()
    mean_share = share.sum(dim=1) / n_pos.clamp_min(1).to(share.dtype)
    diagnostics = {
        "uncertainty": fu,
        "belief_pos": fb_pos,
        "belief_neg": fb_neg,
        "weights": mean_share,
        "conflict": conflict.mean(),
    }
    return out, diagnostics, (share.sum(dim=1), n_pos)


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
    group_offsets: Tensor | None = None,
    mean_out: Tensor | None = None,
    var_out: Tensor | None = None,
    out: Tensor | None = None,
) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
    """One BOGC step with the EMA estimator: what the fused kernel computes in one pass.

    ``mean, var`` is the EMA state (``ema_moments``). Returns ``(out, mean_new, var_new,
    stats)``; ``stats`` holds ``gram`` (G x M x M, float64, one per parameter group),
    ``sum_sq`` (||sum_m g_m||^2), ``out_sq`` (||out||^2 before rescaling), ``nonfinite``
    (count of non-finite entries of g), ``uncertainty`` (mean fused u), ``conflict`` and
    ``weights``. Given ``mean_out``, ``var_out``, ``out``, the results are written there
    (the inputs stay untouched); the step uses the variance before it is rounded into
    ``var_out``.
    """
    mean_new, var_new = ema_moments(g, mean, var, step, beta)
    res, stats = _calibrate(g, var_new, gamma, eps, confidence, weights, rescale, group_offsets)
    return _into(out, res, g.dtype), _into(mean_out, mean_new), _into(var_out, var_new), stats


def bogc_sample_step(
    samples: Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    confidence: str = "belief",
    weights: str = "belief",
    rescale: bool = True,
    group_offsets: Tensor | None = None,
    out: Tensor | None = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One BOGC step with the sample estimator (``S x M x N``): returns ``(out, stats)``.

    The direction uses the per-objective means; the norm matching uses their sum.
    """
    mu, var = sample_moments(samples)
    res, stats = _calibrate(mu, var, gamma, eps, confidence, weights, rescale, group_offsets)
    return _into(out, res, samples.dtype), stats


def _into(dst: Tensor | None, src: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``src`` copied into ``dst`` (rounded once to dst's dtype), or returned in ``dtype``."""
    if dst is not None:
        return dst.copy_(src)
    return src if dtype is None else src.to(dtype)


def _calibrate(mu, var, gamma, eps, confidence, weights, rescale, group_offsets):
    from .moo import gram  # local import: moo imports nothing from here

    out, diag, (share_sum, share_count) = _bogc_core(mu, var, gamma, eps, confidence, weights)
    mu64 = mu.to(torch.float64)
    sum_sq = mu64.sum(dim=0).pow(2).sum()
    out_sq = out.to(torch.float64).pow(2).sum()
    if rescale:
        out = match_norm_(out.clone(), {"sum_sq": sum_sq, "out_sq": out_sq})
    # left in the compute dtype: the caller rounds once into its output (_into)
    stats = {
        "gram": gram(mu, group_offsets=V.check_group_offsets(group_offsets, mu.shape[1])),
        "sum_sq": sum_sq,
        "out_sq": out_sq,
        "nonfinite": (~torch.isfinite(mu)).sum(),
        "uncertainty": diag["uncertainty"].mean(),
        "conflict": diag["conflict"],
        "weights": diag["weights"],
        "share_sum": share_sum.to(torch.float64),
        "share_count": share_count.to(torch.float64),
    }
    return out, stats


def raw_output(out: Tensor) -> Tensor:
    """Where a kernel writes the step's output before norm matching: ``out`` itself, or a
    float32 buffer for half dtypes (an unscaled half output underflows, and scaling it
    afterwards would round it twice)."""
    if out.dtype in (torch.float32, torch.float64):
        return out
    return torch.empty(out.shape, dtype=torch.float32, device=out.device)


def finish_output(out: Tensor, raw: Tensor, stats: Dict[str, Tensor], rescale: bool) -> Tensor:
    """Norm matching (docs/spec.md §3.7) on ``raw``, then one rounding into ``out``."""
    if rescale:
        match_norm_(raw, stats)
    return out if raw is out else out.copy_(raw)


def match_norm_(out: Tensor, stats: Dict[str, Tensor]) -> Tensor:
    """docs/spec.md §3.7 in place on the N outputs: ``out *= ||sum_m g_m|| / ||out||`` from a step's stats."""
    ratio = _norm_ratio(stats["sum_sq"], stats["out_sq"])
    if out.dtype in (torch.float16, torch.bfloat16):
        # the ratio itself may exceed fp16's range (an output that underflowed to 0 times
        # inf is NaN): scale in float32, round once
        return out.copy_(out.float() * ratio.float())
    return out.mul_(ratio.to(out.dtype))


def _norm_ratio(sum_sq: Tensor, out_sq: Tensor) -> Tensor:
    """||sum g|| / ||out||, and 0 where out is all zeros (nothing to scale)."""
    positive = out_sq > 0
    return torch.where(positive, torch.sqrt(sum_sq / torch.where(positive, out_sq, torch.ones_like(out_sq))), torch.zeros_like(out_sq))
