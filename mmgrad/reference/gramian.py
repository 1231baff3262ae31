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

The projection onto the dual cone is the quadratic program ``min_v v^T G v`` subject to
``v >= u`` (Proposition 1 of the UPGrad paper), solved exactly by an active-set method
(``nonnegative_qp``) on the Gramian normalised to unit trace and regularised by
``reg_eps * I``, as TorchJD 0.18 poses it to quadprog; mmgrad needs no QP package.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .. import _validation as V

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


def dual_cone_projection(gram: Tensor, u: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> np.ndarray:
    """The weights ``v`` of the projection of ``J^T u`` onto the dual cone of J's rows:
    ``min v^T G v`` subject to ``v >= u``, with G normalised to unit trace (zero below
    ``norm_eps``) and ``reg_eps`` added to its diagonal."""
    k = _gram(gram)
    trace = float(np.trace(k))
    k = np.zeros_like(k) if trace < norm_eps else k / trace
    k = k + reg_eps * np.eye(k.shape[0])
    # v = u + x, x >= 0: min x^T G x + 2 (G u)^T x
    return u + nonnegative_qp(2 * k, 2 * k @ u)


def upgrad_weights(gram: Tensor, pref_vector: Optional[Sequence[float]] = None, norm_eps: float = 1e-4,
                   reg_eps: float = 1e-4) -> Tensor:
    """UPGrad: ``sum_i v_i``, ``v_i`` the dual-cone projection weights of ``pref_i e_i``.

    >>> j = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    >>> w = upgrad_weights(j @ j.T)
    >>> [round(float(x), 4) for x in j.T @ w]
    [0.2929, 1.9004, 1.9004]
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
