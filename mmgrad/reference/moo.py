"""Multi-objective weights in plain PyTorch/NumPy (docs/spec.md §4): the oracle and the host solver.

The weights need only the M x M Gram matrix of a parameter group, so the solvers here
are tiny (M <= a few dozen) and run in float64 on the host for the reference and the
CPU backend alike.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .. import _validation as V

Tensor = torch.Tensor

from .._constants import MOO_GAP_TOL as MGDA_GAP_TOL  # noqa: E402 - duality gap, relative to max_i K_ii
from .._constants import MOO_METHODS

MGDA_MAX_ITER = 1000


def gram(g: Tensor, *, group_offsets: Tensor | None = None) -> Tensor:
    """``K_ij = <g_i, g_j>`` in float64: ``M x M``, or ``G x M x M`` per group.

    >>> gram(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([[ 5., 11.],
            [11., 25.]], dtype=torch.float64)
    """
    V.check_float_tensor("g", g, dim=2)
    g64 = g.to(torch.float64)
    if group_offsets is None:
        return g64 @ g64.T
    off = V.check_group_offsets(group_offsets, g.shape[1]).tolist()
    return torch.stack([g64[:, a:b] @ g64[:, a:b].T for a, b in zip(off[:-1], off[1:])])


def _check_gram(k: Tensor) -> np.ndarray:
    V.check_float_tensor("gram", k, dim=2)
    if k.shape[0] != k.shape[1] or k.shape[0] < 1:
        raise ValueError(f"gram must be square M x M with M >= 1; got shape {tuple(k.shape)}")
    a = k.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(a).all():
        raise ValueError("gram has non-finite entries (a gradient overflowed or was NaN)")
    return a


def _min_norm_two(k11: float, k12: float, k22: float) -> float:
    """Weight ``t`` on the first vector of ``min ||t g1 + (1-t) g2||``, exact."""
    denom = k11 + k22 - 2.0 * k12
    if denom <= 0.0:  # g1 == g2: every t gives the same point
        return 0.5
    return float(min(1.0, max(0.0, (k22 - k12) / denom)))


def min_norm_solve(k: np.ndarray) -> np.ndarray:
    """``argmin_{a in simplex} a^T K a`` for a PSD K with positive diagonal.

    M = 2 in closed form. M > 2 by Wolfe's minimum-norm-point algorithm on the Gram
    matrix (an active-set method: exact minimisers on faces of the simplex, finitely
    many faces), stopped by the duality-gap certificate of docs/spec.md §4 or after 1000
    iterations. Projected gradient, as first specified, crawled along the flat
    directions of rank-deficient K (N < M) and missed the certificate (docs/spec.md, §9).
    """
    m = k.shape[0]
    if m == 1:
        return np.ones(1)
    if m == 2:
        t = _min_norm_two(k[0, 0], k[0, 1], k[1, 1])
        return np.array([t, 1.0 - t])
    k = k / np.max(np.diag(k))  # scale-free: the gap test below is relative
    a = np.zeros(m)
    first = int(np.argmin(np.diag(k)))
    a[first] = 1.0
    face = np.zeros(m, dtype=bool)
    face[first] = True
    iterations = 0
    while iterations < MGDA_MAX_ITER:
        ka = k @ a
        j = int(np.argmin(ka))
        if a @ ka - ka[j] <= MGDA_GAP_TOL or face[j]:  # certificate (or no progress left)
            break
        face[j] = True
        while iterations < MGDA_MAX_ITER:  # minimise on the face, dropping vertices that leave it
            iterations += 1
            beta = _face_minimiser(k, face)
            if (beta[face] > 0).all():
                a = beta
                break
            out = face & (beta <= 0)
            t = float(np.min(a[out] / (a[out] - beta[out])))
            a = np.maximum(a + t * (beta - a), 0.0)
            face &= a > 1e-15
            a[~face] = 0.0
            a /= a.sum()
    return a


def _face_minimiser(k: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Minimiser of ``a^T K a`` on the affine hull of a face (its KKT system, least squares)."""
    nf = int(face.sum())
    kkt = np.zeros((nf + 1, nf + 1))
    kkt[:nf, :nf] = k[np.ix_(face, face)]
    kkt[:nf, nf] = kkt[nf, :nf] = 1.0
    rhs = np.zeros(nf + 1)
    rhs[nf] = 1.0
    beta = np.zeros(k.shape[0])
    beta[face] = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:nf]
    return beta


def _normalizers(k: np.ndarray, normalize: str, losses: Tensor | Sequence[float] | None) -> np.ndarray:
    if normalize == "none":
        return np.ones(k.shape[0])
    if normalize == "l2":
        return np.sqrt(np.maximum(np.diag(k), 0.0))
    if losses is None:
        raise ValueError('losses must be given when normalize="loss"')
    vals = np.asarray(torch.as_tensor(losses, dtype=torch.float64).detach().cpu(), dtype=np.float64).reshape(-1)
    if vals.size != k.shape[0]:
        raise ValueError(f"losses must hold M={k.shape[0]} values; got {vals.size}")
    if not (np.isfinite(vals).all() and (vals > 0).all()):
        raise ValueError('normalize="loss" needs finite, positive losses')
    return vals


def mgda_weights(gram: Tensor, normalize: str = "none", *, losses: Tensor | Sequence[float] | None = None) -> Tensor:
    """MGDA's min-norm weights ``alpha`` (on the simplex) from an ``M x M`` Gram matrix.

    Objectives with an all-zero gradient (``K_mm = 0``) get weight 0; ``K = 0`` gives
    uniform weights. ``normalize`` ("none", "l2", "loss") rescales g_m before the
    solve, as Sener & Koltun do; the weights then apply to the raw gradients.

    >>> mgda_weights(torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=torch.float64))
    tensor([0.7143, 0.2857], dtype=torch.float64)
    """
    V.check_choice("normalize", normalize, V.MGDA_NORMALIZATIONS)
    k = _check_gram(gram)
    m = k.shape[0]
    active = np.diag(k) > 0
    alpha = np.zeros(m)
    if not active.any():
        alpha[:] = 1.0 / m
    else:
        scale = _normalizers(k, normalize, losses)[active]
        ka = k[np.ix_(active, active)] / np.outer(scale, scale)
        alpha[active] = min_norm_solve(ka)
    return torch.from_numpy(alpha).to(gram.device)


def _mmpareto_direction(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The objectives that reach (``K_mm > 0``) and their direction weights ``c = n * alpha``:
    uniform when every pair has a positive cosine, else MGDA's min-norm point."""
    active = np.diag(k) > 0
    n = int(active.sum())
    if n == 0:
        return active, np.zeros(0)
    ka = k[np.ix_(active, active)]
    d = np.sqrt(np.diag(ka))
    cos = ka / np.outer(d, d)
    alpha = np.full(n, 1.0 / n) if (cos > 0).all() else min_norm_solve(ka)
    return active, n * alpha


def _mmpareto_boost(k: np.ndarray, c: np.ndarray) -> float:
    """MMPareto's magnitude rule: ``sum_m c_m g_m`` scaled up, never down, to ``||sum_m g_m||``
    (``k``: their Gram matrix over the reaching objectives)."""
    c_sq, sum_sq = c @ k @ c, k.sum()
    return max(1.0, float(np.sqrt(sum_sq / c_sq))) if c_sq > 0 else 1.0


def mmpareto_weights(gram: Tensor, magnitude: float = 1.5) -> Tensor:
    """MMPareto's combination weights for one parameter group, the rule applied once to the
    whole group (``scope="group"``, mmgrad's variant; docs/spec.md §4).

    Direction: uniform over the objectives that reach the group when every pair has
    a positive cosine, else MGDA's min-norm weights. Magnitude (MMPareto's rule):
    ``n * sum_m alpha_m g_m`` is scaled up, never down, to ``||sum_m g_m||``, then by
    ``magnitude``. Returns the final weights ``w`` with ``out = sum_m w_m g_m``.
    """
    magnitude = V.check_positive("magnitude", magnitude)
    k = _check_gram(gram)
    active, c = _mmpareto_direction(k)
    w = np.zeros(k.shape[0])
    if c.size:
        w[active] = c * _mmpareto_boost(k[np.ix_(active, active)], c) * magnitude
    return torch.from_numpy(w).to(gram.device)


def mmpareto_tensor_weights(tensor_grams: Tensor, group_of: Sequence[int], magnitude: float = 1.5) -> Tensor:
    """MMPareto's weights as its official step computes them (``scope="tensor"``, the
    default): the direction from each group's Gram matrix (the sum of its tensors'), the
    magnitude rule per parameter tensor, from that tensor's own ``M x M`` Gram matrix.
    ``tensor_grams``: ``P x M x M``; ``group_of[p]``: parameter p's group. Returns
    ``P x M`` weights, ``out_p = sum_m w[p, m] g_m`` on parameter p.

    >>> k = torch.tensor([[[4.0, -1.0], [-1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    >>> mmpareto_tensor_weights(k, [0, 0]).shape
    torch.Size([2, 2])
    """
    magnitude = V.check_positive("magnitude", magnitude)
    V.check_float_tensor("tensor_grams", tensor_grams, dim=3)
    k = tensor_grams.detach().to("cpu", torch.float64).numpy()
    if len(group_of) != k.shape[0]:
        raise ValueError(f"group_of must name a group for each of the {k.shape[0]} tensors; got {len(group_of)}")
    w = np.zeros(k.shape[:2])
    for group in sorted(set(group_of)):
        members = [p for p, g in enumerate(group_of) if g == group]
        active, c = _mmpareto_direction(_check_gram(torch.from_numpy(sum(k[p] for p in members))))
        for p in members:
            if c.size:
                w[p, active] = c * _mmpareto_boost(k[p][np.ix_(active, active)], c) * magnitude
    return torch.from_numpy(w).to(tensor_grams.device)


def moo_weights(grams: Tensor, method: str, *, normalize: str = "none", losses: Tensor | Sequence[float] | None = None,
                magnitude: float = 1.5, **options: Any) -> Tensor:
    """Per-group weights of a Gramian ``method`` from ``G x M x M`` Gram matrices: ``G x M``.

    ``"mgda"`` and ``"mmpareto"`` (with ``normalize``/``losses`` and ``magnitude``): the
    calibrator's one call per step, which the triton backend solves for all groups in one
    kernel on the device (no host synchronisation). Every other Gramian baseline
    (``mmgrad.reference.gramian.HOST_SOLVED``: ``"upgrad"``, ``"cagrad"``, ...) takes its
    options as keywords and is solved on the host, on every backend.

    >>> moo_weights(torch.tensor([[[1.0, -1.0], [-1.0, 4.0]]], dtype=torch.float64), "mgda")
    tensor([[0.7143, 0.2857]], dtype=torch.float64)
    >>> moo_weights(torch.tensor([[[1.0, 0.0], [0.0, 4.0]]], dtype=torch.float64), "upgrad")
    tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """
    from .gramian import HOST_SOLVED, gramian_weights  # gramian imports this module's min-norm solver

    V.check_choice("method", method, (*MOO_METHODS, *HOST_SOLVED))
    if method in HOST_SOLVED:
        return gramian_weights(grams, method, **options)
    if options:
        raise TypeError(f"unknown option(s) {sorted(options)} for method={method!r}; it takes normalize, losses "
                        "and magnitude")
    V.check_float_tensor("grams", grams, dim=3)
    if method == "mgda":
        return torch.stack([mgda_weights(k, normalize, losses=losses) for k in grams])
    return torch.stack([mmpareto_weights(k, magnitude) for k in grams])


def mimo_weights(losses: Tensor | Sequence[float], rho: float = 1.0, tau: float = 1.0) -> Tensor:
    """MIMO's weights: 1 for the fusion loss (index 0), ``rho * softmax(f/tau)`` for the rest.

    They are the gradient weights of ``F = f0 + rho * tau * logsumexp(f_1..f_M / tau)``.

    >>> mimo_weights(torch.tensor([0.5, 1.0, 1.0]))
    tensor([1.0000, 0.5000, 0.5000])
    """
    rho, tau = V.check_positive("rho", rho), V.check_positive("tau", tau)
    f = torch.as_tensor(losses).detach()
    if not f.is_floating_point():
        f = f.to(torch.float32)
    if f.dim() != 1 or f.numel() < 2:
        raise ValueError(f"losses must be 1-D with the fusion loss first and >= 1 unimodal loss; got shape {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError("losses must be finite")
    return torch.cat([torch.ones_like(f[:1]), rho * torch.softmax(f[1:] / tau, dim=0)])


def ogm_coefficients(view_losses: Tensor | Sequence[float], alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """OGM-GE's modulation (docs/spec.md §4): per view v, confidence ``s_v = exp(-f_v)``, the
    discrepancy ``rho_v = mean_{u != v} s_v / s_u`` and the coefficient
    ``k_v = 1 - tanh(alpha * rho_v)`` where ``rho_v > 1``, else 1. Returns ``(k, rho)``.
    One view alone is never modulated (``rho = 1``).

    >>> k, rho = ogm_coefficients(torch.tensor([0.2, 0.9]))   # view 0 dominates
    >>> [round(float(x), 4) for x in rho], [round(float(x), 4) for x in k]
    ([2.0138, 0.4966], [0.2355, 1.0])
    """
    alpha = V.check_positive("alpha", alpha)
    f = _view_vector("view_losses", "loss", view_losses)
    # s_v / s_u = exp(f_u - f_v): in the log domain, no underflow of exp(-f) for large losses
    return _ogm_from_ratios(torch.exp(f[None, :] - f[:, None]), alpha)


def ogm_coefficients_from_scores(scores: Tensor | Sequence[float], alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """OGM-GE's modulation from the views' scores ``s_v`` (the official step's summed
    true-class probabilities, ``mmgrad.methods.ogm_scores``): ``rho_v = mean_{u != v}
    s_v / s_u`` and ``k_v = 1 - tanh(alpha * rho_v)`` where ``rho_v > 1``, else 1. With two
    views this is the official step's ``ratio_v = score_v / score_a`` rule.

    >>> k, rho = ogm_coefficients_from_scores(torch.tensor([30.0, 10.0]))
    >>> [round(float(x), 4) for x in rho], [round(float(x), 4) for x in k]
    ([3.0, 0.3333], [0.0949, 1.0])
    """
    alpha = V.check_positive("alpha", alpha)
    s = _view_vector("scores", "score", scores)
    return _ogm_from_ratios(s[:, None] / s[None, :], alpha)


def _view_vector(name: str, noun: str, values) -> Tensor:
    """One value per view, as a float64 vector (ValueError naming ``name`` otherwise)."""
    t = torch.as_tensor(values).detach().to(torch.float64)
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name} must be 1-D with >= 1 {noun}; got shape {tuple(t.shape)}")
    return t


def _ogm_from_ratios(ratios: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(k, rho)`` from the ``V x V`` ratios ``[v, u] = s_v / s_u``; one view alone is never modulated."""
    v = ratios.shape[0]
    if v == 1:
        return torch.ones(1, dtype=torch.float64, device=ratios.device), torch.ones(1, dtype=torch.float64, device=ratios.device)
    rho = (ratios.sum(dim=1) - 1.0) / (v - 1)  # the diagonal is s_v / s_v = 1
    k = torch.where(rho > 1.0, 1.0 - torch.tanh(alpha * rho), torch.ones_like(rho))
    return k, rho


def combine(g: Tensor, alpha: Tensor, *, group_offsets: Tensor | None = None) -> Tensor:
    """``sum_m alpha_m g_m``: ``alpha`` is ``M``, or ``G x M`` with ``group_offsets``.

    >>> combine(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.5, 0.5]))
    tensor([2., 3.])
    """
    V.check_float_tensor("g", g, dim=2)
    V.check_float_tensor("alpha", alpha)
    m = g.shape[0]
    dt = torch.promote_types(g.dtype, torch.float32)
    if group_offsets is None:
        if alpha.shape != (m,):
            raise ValueError(f"alpha must have shape ({m},); got {tuple(alpha.shape)}")
        return (alpha.to(g.device, dt)[:, None] * g.to(dt)).sum(dim=0).to(g.dtype)
    off = V.check_group_offsets(group_offsets, g.shape[1]).tolist()
    if alpha.shape != (len(off) - 1, m):
        raise ValueError(f"alpha must have shape ({len(off) - 1}, {m}) for {len(off) - 1} groups; got {tuple(alpha.shape)}")
    a = alpha.to(g.device, dt)
    parts = [(a[i][:, None] * g[:, lo:hi].to(dt)).sum(dim=0) for i, (lo, hi) in enumerate(zip(off[:-1], off[1:]))]
    return torch.cat(parts).to(g.dtype)


def combine_and_gram(
    g: Tensor,
    alpha: Tensor,
    *,
    group_offsets: Tensor | None = None,
    out: Tensor | None = None,
    with_gram: bool = True,
) -> tuple[Tensor, dict]:
    """``combine`` plus, from the same read in the kernels, the per-group Gram (``G x M x M``)
    and the count of non-finite entries of ``g``: what the lagged MOO step needs."""
    res = combine(g, alpha, group_offsets=group_offsets)
    if out is not None:
        res = out.copy_(res)
    stats = {"nonfinite": (~torch.isfinite(g)).sum()}
    if with_gram:
        stats["gram"] = gram(g, group_offsets=V.check_group_offsets(group_offsets, g.shape[1]))
    return res, stats
