"""The Gramian baselines of multi-objective learning in float64: each a function of one
parameter group's ``M x M`` Gram matrix ``G = J J^T`` (J: the group's per-objective
gradients) to ``M`` weights ``w``, the group's update being ``J^T w``. The oracle of the
methods of the same names, and their host solvers (tiny: M is a few objectives).

* ``upgrad_weights``: UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective
  Optimization", 2024): each row projected onto the dual cone of the rows, then averaged.
* ``dualproj_weights``: DualProj, the same paper's projection of the average.
* ``pcgrad_weights``: PCGrad (Yu et al., NeurIPS 2020), in the Gramian.
* ``imtl_g_weights``: IMTL-G (Liu et al., ICLR 2021).
* ``aligned_mtl_weights``: Aligned-MTL (Senushkin et al., CVPR 2023).
* ``cagrad_weights``: CAGrad (Liu et al., NeurIPS 2021).
* ``nash_mtl_weights``: Nash-MTL (Navon et al., ICML 2022).

The projection onto the dual cone is the quadratic program ``min_v v^T G v`` subject to
``v >= u`` (Proposition 1 of the UPGrad paper), solved exactly by an active-set method
(``nonnegative_qp``) on the Gramian normalised to unit trace and regularised by
``reg_eps * I``, as TorchJD 0.18 poses it to quadprog; mmgrad needs no QP package.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _validation as V
from .._constants import DUAL_CONE_METHODS
from .moo import min_norm_solve

Tensor = torch.Tensor


def _gram(g: Tensor) -> np.ndarray:
    V.check_float_tensor("gram", g, dim=2)
    if g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be M x M; got {tuple(g.shape)}")
    k = g.detach().to("cpu", torch.float64).numpy()
    return (k + k.T) / 2


def _pref(pref_vector: Optional[Sequence[float]], m: int) -> np.ndarray:
    if pref_vector is None:
        return np.full(m, 1.0 / m)
    u = np.asarray(pref_vector, dtype=np.float64).reshape(-1)
    if u.size != m:
        raise ValueError(f"pref_vector must hold M = {m} values; got {u.size}")
    return u


def nonnegative_qp(q: np.ndarray, c: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """``argmin_{x >= 0} x^T q x / 2 + c^T x`` for a positive definite ``q``, exactly: the
    active-set method of Lawson and Hanson, which ends when the free variables' linear
    system is solved with every multiplier of the bound constraints non-negative."""
    m = c.size
    x = np.zeros(m)
    free = np.zeros(m, dtype=bool)
    tol = 1e-14 * max(1.0, float(np.abs(c).max()), float(np.abs(q).max()))
    for _ in range(max_iter):
        grad = q @ x + c
        candidates = np.where(~free & (grad < -tol))[0]
        if candidates.size == 0:
            return x
        free[candidates[np.argmin(grad[candidates])]] = True
        while True:
            z = np.zeros(m)
            idx = np.where(free)[0]
            z[idx] = np.linalg.solve(q[np.ix_(idx, idx)], -c[idx])
            if (z[idx] > 0).all():
                x = z
                break
            blocked = idx[z[idx] <= 0]
            step = np.min(x[blocked] / (x[blocked] - z[blocked]))
            x = x + step * (z - x)
            free &= x > tol
            x[~free] = 0.0
    raise RuntimeError("nonnegative_qp did not converge")  # pragma: no cover - finite for PD q


def dual_cone_gram(gram: Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> np.ndarray:
    """The Gramian the dual-cone programs solve with: normalised to unit trace (zero when
    the trace is below ``norm_eps``, or 0) and ``reg_eps`` added to its diagonal."""
    k = _gram(gram)
    trace = float(np.trace(k))
    k = np.zeros_like(k) if trace < norm_eps or trace == 0 else k / trace
    return k + reg_eps * np.eye(k.shape[0])


def dual_cone_projection(gram: Tensor, u: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> np.ndarray:
    """The weights ``v`` of the projection of ``J^T u`` onto the dual cone of J's rows:
    ``min v^T G v`` subject to ``v >= u``, with G as ``dual_cone_gram`` poses it."""
    k = dual_cone_gram(gram, norm_eps, reg_eps)
    # v = u + x, x >= 0: min x^T G x + 2 (G u)^T x
    return u + nonnegative_qp(2 * k, 2 * k @ u)


def upgrad_weights(gram: Tensor, pref_vector: Optional[Sequence[float]] = None, norm_eps: float = 1e-4,
                   reg_eps: float = 1e-4) -> Tensor:
    """UPGrad: ``sum_i v_i``, ``v_i`` the dual-cone projection weights of ``pref_i e_i``.

    >>> j = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    >>> w = upgrad_weights(j @ j.T)
    >>> print(*[round(float(x), 4) for x in j.T @ w])
    0.2929 1.9004 1.9004
    """
    k = _gram(gram)
    u = _pref(pref_vector, k.shape[0])
    w = sum(dual_cone_projection(gram, u[i] * np.eye(k.shape[0])[i], norm_eps, reg_eps) for i in range(k.shape[0]))
    return torch.from_numpy(np.asarray(w, dtype=np.float64)).to(gram.device)


def dualproj_weights(gram: Tensor, pref_vector: Optional[Sequence[float]] = None, norm_eps: float = 1e-4,
                     reg_eps: float = 1e-4) -> Tensor:
    """DualProj: the dual-cone projection weights of the preference-weighted average."""
    k = _gram(gram)
    w = dual_cone_projection(gram, _pref(pref_vector, k.shape[0]), norm_eps, reg_eps)
    return torch.from_numpy(w).to(gram.device)


def dual_cone_weights(grams: Tensor, method: str, *, pref_vector: Optional[Sequence[float]] = None,
                      norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Tensor:
    """``G x M`` weights of ``"upgrad"`` or ``"dualproj"`` from ``G x M x M`` Gram
    matrices, solved on the host: the oracle of the triton backend's device solver.

    >>> k = torch.tensor([[[1.0, -1.5], [-1.5, 4.0]]], dtype=torch.float64)
    >>> w = dual_cone_weights(k, "dualproj", norm_eps=0.0, reg_eps=0.0)  # the mean conflicts with objective 0
    >>> w, k[0] @ w[0]  # raised until it no longer does
    (tensor([[0.7500, 0.5000]], dtype=torch.float64), tensor([0.0000, 0.8750], dtype=torch.float64))
    """
    V.check_choice("method", method, DUAL_CONE_METHODS)
    V.check_float_tensor("grams", grams, dim=3)
    V.check_dual_cone_options(pref_vector, norm_eps, reg_eps, grams.shape[1])
    return gramian_weights(grams, method, pref_vector=pref_vector, norm_eps=norm_eps, reg_eps=reg_eps)


def pcgrad_weights(gram: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad in the Gramian: for each objective i, its gradient projected, in the order
    ``orders[i]`` (a permutation of the objectives), off every one it conflicts with at
    that point (``g_i^PC . g_j < 0``); the weights of the sum of the projected gradients."""
    k = _gram(gram)
    m = k.shape[0]
    if len(orders) != m:
        raise ValueError(f"orders must hold one permutation per objective ({m}); got {len(orders)}")
    w = np.zeros(m)
    for i in range(m):
        current = np.zeros(m)
        current[i] = 1.0
        for j in orders[i]:
            if j == i:
                continue
            inner = k[j] @ current
            if inner < 0.0:
                current[j] -= inner / k[j, j]
        w += current
    return torch.from_numpy(w).to(gram.device)


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G: ``v = G^+ d`` with ``d_i = ||g_i||``, normalised to sum 1 (0 if it sums to ~0):
    the update then has equal projections onto every unit gradient."""
    k = torch.from_numpy(_gram(gram))
    v = torch.linalg.pinv(k) @ torch.sqrt(torch.diagonal(k).clamp_min(0))
    total = v.sum()
    w = torch.zeros_like(v) if float(total.abs()) < 1e-12 else v / total
    return w.to(gram.device)


ALIGNED_MTL_SCALES = ("min", "median", "rmse")


def aligned_mtl_weights(gram: Tensor, pref_vector: Optional[Sequence[float]] = None, scale_mode: str = "min") -> Tensor:
    """Aligned-MTL: the preference weights through the balance transformation
    ``B = sqrt(scale) V S^-1/2 V^T`` of the Gramian's non-null eigenpairs (``scale``: the
    smallest, the median or the mean of their eigenvalues), which aligns the gradients
    and equalises their conditioning."""
    V.check_choice("scale_mode", scale_mode, ALIGNED_MTL_SCALES)
    V.check_float_tensor("gram", gram, dim=2)
    k = gram.detach().to("cpu", torch.float64)
    m = k.shape[0]
    u = torch.from_numpy(_pref(pref_vector, m))
    lam, vec = torch.linalg.eigh(k, UPLO="U")  # the upper triangle, as TorchJD reads it
    tol = lam.max() * m * torch.finfo(k.dtype).eps
    rank = int((lam > tol).sum())
    if rank == 0:
        return u.to(gram.device)
    order = torch.argsort(lam, descending=True)[:rank]
    lam, vec = lam[order], vec[:, order]
    scale = {"min": lam[-1], "median": torch.median(lam), "rmse": lam.mean()}[scale_mode]
    b = scale.sqrt() * vec @ torch.diag(1 / lam.sqrt()) @ vec.T
    return (b @ u).to(gram.device)


CAGRAD_RESCALES = (0, 1, 2)


def cagrad_weights(gram: Tensor, c: float = 0.5, rescale: int = 1, norm_eps: float = 1e-4) -> Tensor:
    """CAGrad: the update ``g0 + (sqrt_phi / ||g_w||) g_w`` (``g0`` the mean gradient,
    ``sqrt_phi = c ||g0||``, ``g_w = J^T w``), ``w`` the exact minimiser over the simplex of
    ``w^T G u + sqrt_phi sqrt(w^T G w)`` (``u = 1/M``); divided by 1, ``1 + c^2`` or
    ``1 + c`` (``rescale`` 0, 1, 2, as the official code). G is normalised to unit trace
    (zero below ``norm_eps``, as TorchJD poses it); ``||g_w|| < norm_eps`` gives zero weights.
    An objective with a zero gradient (one that reaches none of the group) takes weight 0
    and the others are averaged alone, as mmgrad's MGDA does: in the Gramian it would be
    a Pareto-stationary point, and the whole group's update zero.

    ``c = 0`` is the mean. The solve is exact (``cagrad_simplex_solve``), where TorchJD
    calls a conic solver and the official code SciPy's SLSQP.

    >>> j = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    >>> print(*[round(float(x), 4) for x in cagrad_weights(j @ j.T, c=0.4, rescale=0)])
    0.7448 0.6384
    """
    out = _on_live_rows(_gram(gram), lambda k: _cagrad_live(k, c, norm_eps)) / (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    return torch.from_numpy(out).to(gram.device)


def _cagrad_live(k: np.ndarray, c: float, norm_eps: float) -> np.ndarray:
    m = k.shape[0]
    u = np.full(m, 1.0 / m)
    trace = float(np.trace(k))
    k = np.zeros_like(k) if trace < norm_eps else k / trace
    sqrt_phi = c * float(np.sqrt(max(u @ k @ u, 0.0)))
    w = cagrad_simplex_solve(k, k @ u, sqrt_phi)
    norm = float(np.sqrt(max(w @ k @ w, 0.0)))
    return u + (sqrt_phi / norm) * w if norm >= norm_eps else np.zeros(m)


def _on_live_rows(k: np.ndarray, solve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``solve`` on the Gram of the objectives with a gradient in this group, weight 0 for
    the others (a zero row: an objective that reaches none of the group)."""
    diag = np.diag(k)
    live = diag > 1e-14 * float(diag.max()) if diag.size and diag.max() > 0 else np.zeros(diag.size, dtype=bool)
    out = np.zeros(k.shape[0])
    if live.any():
        idx = np.where(live)[0]
        out[idx] = solve(k[np.ix_(idx, idx)])
    return out


def cagrad_simplex_solve(k: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """``argmin_{w in simplex} b^T w + s sqrt(w^T K w)`` for ``b = K u``, exactly.

    Its KKT conditions, with ``v = (s / ||R^T w||) w`` (K = R R^T), are those of the
    nonnegative QP ``min_{v >= 0} v^T K v / 2 + (b - lam)^T v`` plus ``v^T K v = s^2``, and
    ``w = v / sum(v)``; ``lam`` is then the optimal value. ``v^T K v`` grows with ``lam``
    (its derivative on a support is ``2 sum(v)``); on a fixed support S, ``v_S = lam
    K_SS^-1 1 - K_SS^-1 b_S``, and ``v^T K v = s^2`` is a quadratic in ``lam``. So: bisect
    on ``lam`` with the exact nonnegative QP (``nonnegative_qp``), jumping to the support's
    root where it lies in the bracket, until that root satisfies every KKT condition, and
    return that closed-form point.

    Where the gradients are Pareto-stationary (some ``w`` in the simplex has ``K w = 0``,
    so ``b^T w = 0``), the value is at most 0 and ``lam < 0``; if no ``lam < 0`` reaches
    ``s^2``, that minimum-norm point is the minimiser. ``s = 0`` (or K = 0) gives the
    vertex of the smallest ``b``."""
    m = b.size
    peak = float(np.abs(k).max())
    if s <= 0.0 or peak == 0.0:
        w = np.zeros(m)
        w[int(np.argmin(b))] = 1.0
        return w
    q = k + 1e-15 * float(np.trace(k)) * np.eye(m)  # positive definite for the active-set solves
    lo = float(b.min())  # v = 0 here: v^T K v = 0 < s^2
    # v^T K v >= (lam - b_i)^2 / K_ii for every i (the QP's value -v^T K v / 2 is at most
    # the vertex's), so it reaches s^2 by the smallest b_i + s sqrt(K_ii): the first jump
    diag = np.diag(k)
    reach = np.where(diag > 0, b + s * np.sqrt(np.maximum(diag, 0.0)), np.inf)
    hi = float(reach.min())
    if hi > 0.0:  # lam* may lie above 0 unless the gradients are Pareto-stationary
        nearest = min_norm_solve(k)
        if float(nearest @ k @ nearest) <= 1e-24 * float(np.trace(k)):  # then lam* < 0
            hi = 0.0
            if lo >= 0.0 or _cagrad_norm2(q, b, -1e-300) < s * s:
                return nearest
    lam = hi if hi > lo else (lo + hi) / 2
    for _ in range(200):
        v = _cagrad_qp(q, b - lam)
        exact, root = _cagrad_on_support(k, q, b, s, v > 0)
        if exact is not None:
            return exact / exact.sum()
        if float(v @ q @ v) < s * s:
            lo = lam
        else:
            hi = lam
        # the support's own root, where it lies in the bracket (a piecewise quadratic's
        # Newton-like jump), else the bracket's middle
        lam = root if root is not None and lo < root < hi else (lo + hi) / 2
        if not lo < lam < hi:  # pragma: no cover - every support failed by rounding
            break
    v = _cagrad_qp(q, b - (lo + hi) / 2)  # pragma: no cover
    return v / v.sum()


def _cagrad_qp(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``nonnegative_qp(q, c)``; where rank-deficient gradients leave ``q`` numerically
    singular (eigenvalues near 1e-15 of its trace) and the active set cycles, the same
    program on ``q`` regularised by 1e-12 of its trace, for the search only: the point
    returned is solved on K itself (``_cagrad_on_support``)."""
    try:
        return nonnegative_qp(q, c)
    except RuntimeError:
        return nonnegative_qp(q + 1e-12 * float(np.trace(q)) * np.eye(q.shape[0]), c)


def _cagrad_norm2(q: np.ndarray, b: np.ndarray, lam: float) -> float:
    v = _cagrad_qp(q, b - lam)
    return float(v @ q @ v)


def _cagrad_on_support(k: np.ndarray, q: np.ndarray, b: np.ndarray, s: float,
                       support: np.ndarray) -> Tuple[Optional[np.ndarray], Optional[float]]:
    """The KKT point with ``v`` supported on ``support`` and ``v^T K v = s^2``, or None if
    that support holds none (a negative ``v``, a negative multiplier off the support); and
    the support's root ``lam`` (None if it has none).
    Solved with K itself: its entries on a support can be large where the gradients'
    norms span decades, and K + eps I would then be another problem. A singular K_SS
    (rank-deficient gradients) is solved with ``q``, K's regularised copy."""
    idx = np.where(support)[0]
    if idx.size == 0:
        return None, None
    for mat in (k, q):
        ks = mat[np.ix_(idx, idx)]
        try:
            with np.errstate(all="ignore"):
                v, lam = _support_point(mat, ks, idx, b, s)
        except np.linalg.LinAlgError:
            continue
        if v is None or not np.isfinite(v).all():
            continue
        mult = k @ v + b - lam
        slack = 1e-12 * max(1.0, float(np.abs(b).max()), abs(lam))
        if (v[idx] < -slack).any() or (mult[~support] < -slack).any() or v.sum() <= 0:
            return None, lam
        return np.maximum(v, 0.0), lam
    return None, None


def _support_point(mat: np.ndarray, ks: np.ndarray, idx: np.ndarray, b: np.ndarray,
                   s: float) -> Tuple[Optional[np.ndarray], Optional[float]]:
    """The support's point and root ``lam`` (None where the quadratic has no root)."""
    p = _scaled_solve(ks, np.ones(idx.size))
    r = _scaled_solve(ks, b[idx])
    # (lam p - r)^T K (lam p - r) = lam^2 1.p - 2 lam 1.r + b.r = s^2
    a2, a1, a0 = float(p.sum()), -2.0 * float(r.sum()), float(b[idx] @ r) - s * s
    disc = a1 * a1 - 4 * a2 * a0
    if not a2 > 0 or not disc >= 0:
        return None, None
    lam = (-a1 + np.sqrt(disc)) / (2 * a2)  # the larger root: sum(v) = lam 1.p - 1.r > 0 there
    v = np.zeros(b.size)
    for _ in range(4):  # Newton on v^T K v = s^2 (derivative 2 sum(v)): the formula's root cancels digits
        v[idx] = _scaled_solve(ks, lam - b[idx])
        total = float(v.sum())
        if not total > 0:
            return None, float(lam)
        lam -= (float(v @ mat @ v) - s * s) / (2 * total)
    v[idx] = _scaled_solve(ks, lam - b[idx])
    return v, float(lam)


def _scaled_solve(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``a^-1 rhs`` for a positive definite ``a`` through its unit-diagonal scaling (a Gramian
    of gradients whose norms span decades is ill-conditioned mostly by its diagonal), with
    one step of iterative refinement."""
    d = np.sqrt(np.diag(a))
    c = a / np.outer(d, d)
    x = np.linalg.solve(c, rhs / d) / d
    return x + np.linalg.solve(c, (rhs - a @ x) / d) / d


def nash_mtl_weights(gram: Tensor, max_norm: float = 1.0, tol: float = 1e-12) -> Tensor:
    """Nash-MTL: the Nash bargaining weights ``alpha > 0`` with ``alpha_i (G alpha)_i = 1``
    for every objective, found exactly (``nash_mtl_solve``), then scaled so that
    ``||J^T alpha|| <= max_norm`` (0: no clipping), as the official code clips.

    An objective with a zero gradient takes weight 0 and the others bargain alone; where
    no solution exists (a non-negative combination of the gradients is zero: the point
    is Pareto-stationary), the weights are zero.

    >>> j = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> print(*[round(float(x), 4) for x in nash_mtl_weights(j @ j.T, max_norm=0)])
    0.5 2.0
    """
    k = _gram(gram)
    alpha = _on_live_rows(k, lambda live: nash_mtl_solve(live, tol))
    norm = float(np.sqrt(max(alpha @ k @ alpha, 0.0)))
    if max_norm > 0 and norm > max_norm:
        alpha = alpha * (max_norm / norm)
    return torch.from_numpy(alpha).to(gram.device)


def nash_mtl_solve(k: np.ndarray, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """``alpha > 0`` with ``alpha * (K alpha) = 1``: the minimiser of the self-concordant
    ``f(a) = a^T K a / 2 - sum(log a)`` by damped Newton (Nesterov's step ``1 / (1 +
    lambda)``, ``lambda`` the Newton decrement), which needs at most ``(f(a0) - f*) / 0.09``
    damped steps and then converges quadratically.

    ``f`` has no minimiser when some ``d >= 0, d != 0`` has ``K d = 0`` (the point is
    Pareto-stationary): the iterates then run off along d, and the gradients cancel in
    ``J^T alpha``. A solution has ``alpha^T K alpha = M``; where that is below
    ``CANCELLATION`` times ``(sum_i alpha_i ||g_i||)^2`` (the norm with no cancellation),
    the Nash point is one of rounding in a numerically singular K, and the solve returns
    zeros, as it does when the iterates diverge."""
    m = k.shape[0]
    scale = float(np.trace(k)) / m  # solve for K / scale, then alpha / sqrt(scale)
    ks = k / scale
    norms = np.sqrt(np.diag(ks))
    a = 1.0 / norms
    for _ in range(max_iter):
        grad = ks @ a - 1.0 / a
        try:
            step = np.linalg.solve(ks + np.diag(1.0 / (a * a)), grad)
        except np.linalg.LinAlgError:  # the iterates ran off to infinity along K's null space
            break
        dec = float(np.sqrt(max(grad @ step, 0.0)))
        if dec < tol:
            return a / np.sqrt(scale) if m >= CANCELLATION * float(a @ norms) ** 2 else np.zeros(m)
        a = a - step / (1.0 + dec) if dec > 0.25 else a - step
        if not np.isfinite(a).all() or (a <= 0).any() or m < 1e-3 * CANCELLATION * float(a @ norms) ** 2:
            break
    return np.zeros(m)


#: the smallest ``||J^T alpha||^2 / (sum_i alpha_i ||g_i||)^2`` of a Nash point not taken for rounding
CANCELLATION = 1e-10


def pcgrad_orders(seed: int, step: int, group: int, m: int) -> List[List[int]]:
    """PCGrad's projection order of each of the M objectives in ``group`` on ``step``: a
    function of (seed, step, group) alone, so a resumed run draws the same ones."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + group)
    return [torch.randperm(m, generator=gen).tolist() for _ in range(m)]


def _pcgrad_on_step(gram: Tensor, seed: int = 0, step: int = 1, *, group: int = 0) -> Tensor:
    return pcgrad_weights(gram, pcgrad_orders(seed, step, group, gram.shape[0]))


#: the Gramian baselines solved on the host: name -> the weights of one group's Gram
HOST_SOLVED: Dict[str, Callable[..., Tensor]] = {
    "upgrad": upgrad_weights, "dualproj": dualproj_weights, "pcgrad": _pcgrad_on_step, "cagrad": cagrad_weights,
    "imtl_g": imtl_g_weights, "aligned_mtl": aligned_mtl_weights, "nash_mtl": nash_mtl_weights}


def gramian_weights(grams: Tensor, method: str, **options: Any) -> Tensor:
    """``G x M`` float64 weights of a host-solved Gramian baseline (``HOST_SOLVED``) from
    ``G x M x M`` Gram matrices, per group, with the method's options (``pcgrad``: ``seed``
    and ``step``, which pick its orders).

    >>> k = torch.tensor([[[1.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    >>> gramian_weights(k, "nash_mtl", max_norm=0)
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """
    V.check_choice("method", method, tuple(HOST_SOLVED))
    V.check_float_tensor("grams", grams, dim=3)
    solve = HOST_SOLVED[method]
    extra = [name for name in options if name not in _option_names(solve)]
    if extra:
        raise TypeError(f"unknown option(s) {sorted(extra)} for method={method!r}; it takes {sorted(_option_names(solve))}")
    weights = [solve(k.cpu(), **options, **({"group": g} if method == "pcgrad" else {})) for g, k in enumerate(grams)]
    return torch.stack(weights).to(device=grams.device, dtype=torch.float64)


def _option_names(solve: Callable[..., Tensor]) -> List[str]:
    """The options a host solver takes: its parameters after the Gram, but keyword-only ones."""
    return [p.name for p in list(inspect.signature(solve).parameters.values())[1:] if p.kind is not p.KEYWORD_ONLY]
