"""The dual-cone projections of UPGrad and DualProj on the device (``sync_free=True``).

Both weightings project a preference-weighted combination ``J^T u`` of a group's
gradients onto the dual cone of the gradients. In the Gramian that is the quadratic
program ``min_v v^T K v`` subject to ``v >= u`` (``mmgrad.reference.gramian``), on
``K`` normalised to unit trace plus ``reg_eps * I``. One program solves one projection of
one group (UPGrad: M projections, summed on the device; DualProj: one), with the
interior-point machinery of the MGDA solver in ``triton_kernels``: an infeasible-start
Mizuno-Todd-Ye predictor-corrector on the complementarity problem
``s = K x + K u, x, s >= 0, x o s = 0`` (``v = u + x``), then a few primal-dual
active-set steps that solve the identified face exactly. docs/solver.md argues the start,
the stopping rule and the iteration budget; ``tests/test_device_dual_cone.py`` holds
every draw to the host's solution.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _validation as V
from .._constants import DUAL_CONE_METHODS
from .triton_kernels import (INTERPRET, MOO_BISECTIONS, MOO_MAXNREG, _gauss_jordan, _moo_predictor_length, _newton_matrix,
                             _operator, moo_warps)

Tensor = torch.Tensor

#: Predictor-corrector iterations at most: a budget, not a proven bound (docs/solver.md).
DUAL_CONE_ITERATIONS = 100
#: Active-set steps after the interior point: each solves the face where x > s exactly.
DUAL_CONE_CROSSOVERS = 6
#: Where the interior point stops: mu and the residual of s = K x + K u, with max K_ii <= 1
#: and max u = 1 (both scaled so), are below it.
DUAL_CONE_TARGET = 1e-15


@triton.jit
def _dual_cone_excess(K, u, act, idx, x0, s0, TARGET, M: tl.constexpr, ITERS: tl.constexpr,
                      BISECTIONS: tl.constexpr, CROSSOVERS: tl.constexpr):
    """x >= 0 minimising (u + x)^T K (u + x), K symmetric positive definite: the monotone
    LCP s = K x + q (q = K u), x, s >= 0, x o s = 0, from x = x0 1, s = s0 1 (bounds of
    the solution's: docs/solver.md)."""
    zero = tl.where(act, 0.0, 0.0).to(tl.float64)
    n = tl.sum(act.to(tl.float64), axis=0)
    q = tl.where(act, tl.sum(K * u[None, :], axis=1), 0.0)
    x = tl.where(act, x0, 1.0)
    s = tl.where(act, s0, 1.0)
    r = tl.where(act, s - tl.sum(K * x[None, :], axis=1) - q, 0.0)
    mu = tl.sum(tl.where(act, x * s, 0.0), axis=0) / n
    it = 0
    while (it < ITERS) & ((mu > TARGET) | (tl.max(tl.abs(r), axis=0) > TARGET)):
        it += 1
        # predictor: towards x o s = 0 and s = K x + q, the longest step inside N(1/2)
        dx, _ = _gauss_jordan(_newton_matrix(K, act, idx, x, s), tl.where(act, r - s, 0.0), zero, idx, M)
        ds = tl.where(act, tl.sum(K * dx[None, :], axis=1) - r, 0.0)
        t = _moo_predictor_length(x, s, dx, ds, act, n, BISECTIONS)
        x = x + t * dx
        s = s + t * ds
        # corrector: back towards x o s = mu, the residual kept
        mu = tl.sum(tl.where(act, x * s, 0.0), axis=0) / n
        dx, _ = _gauss_jordan(_newton_matrix(K, act, idx, x, s), tl.where(act, mu / x - s, 0.0), zero, idx, M)
        x = x + dx
        s = s + tl.where(act, tl.sum(K * dx[None, :], axis=1), 0.0)
        r = tl.where(act, s - tl.sum(K * x[None, :], axis=1) - q, 0.0)
        mu = tl.sum(tl.where(act, x * s, 0.0), axis=0) / n
    # crossover: solve the face {x_i > s_i} exactly; accept once it satisfies the KKT conditions
    eye = idx[:, None] == idx[None, :]
    xc = x
    g = s
    done = n * 0.0
    k = 0
    while (k < CROSSOVERS) & (done == 0.0):
        k += 1
        free = act & (xc > g)
        h = tl.where(free[:, None] & free[None, :], K, 0.0) + tl.where(eye & ~free[:, None], 1.0, 0.0)
        z, _ = _gauss_jordan(h, tl.where(free, -q, 0.0), zero, idx, M)
        gz = tl.where(act, tl.sum(K * z[None, :], axis=1) + q, 0.0)
        tol = 1e-12 * tl.maximum(tl.max(tl.abs(z), axis=0), 1.0)
        bad = tl.sum(tl.where((free & (z < -tol)) | (act & ~free & (gz < -tol)), 1.0, 0.0), axis=0)
        done = (bad == 0.0).to(tl.float64)
        xc = z
        g = gz
    return tl.maximum(tl.where(done == 1.0, xc, x), 0.0)


@triton.jit
def _dual_cone_kernel(k_ptr, u_ptr, eps_ptr, v_ptr, M: tl.constexpr, MB: tl.constexpr, ITERS: tl.constexpr,
                      BISECTIONS: tl.constexpr, CROSSOVERS: tl.constexpr):
    """Program (group, p): the weights v >= u_p of the projection of J^T u_p onto the dual cone of J's rows."""
    grp = tl.program_id(0)
    p = tl.program_id(1)
    projections = tl.num_programs(1)
    idx = tl.arange(0, MB)
    valid = idx < M
    both = valid[:, None] & valid[None, :]
    eye = idx[:, None] == idx[None, :]
    K = tl.load(k_ptr + grp * M * M + idx[:, None] * M + idx[None, :], mask=both, other=0.0).to(tl.float64)
    K = 0.5 * (K + tl.trans(K))
    norm_eps = tl.load(eps_ptr)  # float64 in memory: a float argument would be fp32 on the GPU
    reg_eps = tl.load(eps_ptr + 1)
    target = tl.load(eps_ptr + 2)
    diag = tl.sum(tl.where(eye, K, 0.0), axis=1)
    trace = tl.sum(diag, axis=0)
    unit = (trace >= norm_eps) & (trace > 0.0)
    K = tl.where(unit, K / tl.where(unit, trace, 1.0), 0.0) + tl.where(eye & both, reg_eps, 0.0)
    diag = tl.where(unit, diag / tl.where(unit, trace, 1.0), 0.0) + tl.where(valid, reg_eps, 0.0)  # K's diagonal, scaled as K
    u = tl.load(u_ptr + p * M + idx, mask=valid, other=0.0).to(tl.float64)
    scale = tl.max(u, axis=0)  # the projection is positively homogeneous in u: solve at max u = 1
    u = u / tl.where(scale > 0.0, scale, 1.0)
    # a start that dominates the solution: v* K v* <= u K u (v = u is feasible), so
    # x*_i <= ||v*||_2 + max u <= ||u||_K / sqrt(reg_eps) + 1 and s*_i = (K v*)_i <= sqrt(K_ii) ||u||_K
    u_k = tl.sqrt(tl.maximum(tl.sum(u * tl.sum(K * u[None, :], axis=1), axis=0), 0.0))
    top = tl.max(tl.where(valid, diag, 0.0), axis=0)
    x0 = u_k / tl.sqrt(reg_eps) + 1.0
    s0 = tl.maximum(tl.sqrt(top) * u_k, reg_eps)
    x = _dual_cone_excess(K, u, valid, idx, x0, s0, target, M, ITERS, BISECTIONS, CROSSOVERS)
    v = tl.where(scale > 0.0, (u + x) * scale, 0.0)
    tl.store(v_ptr + (grp * projections + p) * M + idx, v, mask=valid)


def _fake_dual_cone(grams, prefs, eps):
    return grams.new_empty(grams.shape[0], prefs.shape[0], grams.shape[1], dtype=torch.float64)


@_operator("triton_dual_cone", (), _fake_dual_cone)
def _dual_cone_op(grams: Tensor, prefs: Tensor, eps: Tensor) -> Tensor:
    """``G x P x M`` projection weights: group g's Gram ``grams[g]`` (float64), projection
    p of ``J^T prefs[p]`` (``prefs``: ``P x M`` float64, >= 0), ``eps`` the float64
    ``(norm_eps, reg_eps, target)``."""
    groups, mm = grams.shape[0], grams.shape[1]
    v = torch.empty(groups, prefs.shape[0], mm, dtype=torch.float64, device=grams.device)
    mb = max(2, triton.next_power_of_2(mm))
    kernel = _dual_cone_kernel if INTERPRET else wrap_triton(_dual_cone_kernel)
    kernel[(groups, prefs.shape[0])](grams, prefs, eps, v, M=mm, MB=mb, ITERS=DUAL_CONE_ITERATIONS,
                                     BISECTIONS=MOO_BISECTIONS, CROSSOVERS=DUAL_CONE_CROSSOVERS,
                                     num_warps=moo_warps(mb), maxnreg=MOO_MAXNREG)
    return v


@functools.lru_cache(maxsize=64)
def _constants(method: str, pref: Optional[Tuple[float, ...]], m: int, norm_eps: float, reg_eps: float,
               device: torch.device) -> Tuple[Tensor, Tensor]:
    """The preference rows and the epsilons on the device, made once: a copy from the
    host at every step would wait for the stream (a synchronisation)."""
    u = torch.full((m,), 1.0 / m, dtype=torch.float64) if pref is None else torch.tensor(pref, dtype=torch.float64)
    prefs = torch.diag(u) if method == "upgrad" else u[None]
    eps = torch.tensor([norm_eps, reg_eps, DUAL_CONE_TARGET], dtype=torch.float64)
    return prefs.to(device), eps.to(device)


def dual_cone_weights(grams: Tensor, method: str, *, pref_vector: Optional[Sequence[float]] = None,
                      norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Tensor:
    """``G x M`` float64 weights of ``upgrad`` or ``dualproj`` from ``G x M x M`` Gram
    matrices on the device, in one launch and one sum, with no host synchronisation:
    ``mmgrad.reference.gramian``'s weights to its solver's accuracy (docs/solver.md).
    M <= 16 and ``reg_eps >= DUAL_CONE_MIN_REG_EPS`` (``dual_cone_device_refusal``). Inputs are not checked for
    finiteness (that would synchronise): a non-finite Gram gives non-finite weights."""
    V.check_choice("method", method, DUAL_CONE_METHODS)
    grams = V.check_float_tensor("grams", grams, dim=3)
    if grams.shape[1] != grams.shape[2] or grams.shape[1] < 1:
        raise ValueError(f"grams must be G x M x M; got {tuple(grams.shape)}")
    if not (grams.is_cuda or INTERPRET):
        raise ValueError(f"grams must be a CUDA tensor for backend='triton'; got one on {grams.device}")
    m = grams.shape[1]
    V.check_dual_cone_options(pref_vector, norm_eps, reg_eps, m)
    why_not = V.dual_cone_device_refusal(m, reg_eps)
    if why_not is not None:
        raise ValueError(f"the triton backend {why_not}; backend='reference' solves any problem")
    pref = None if pref_vector is None else tuple(float(x) for x in pref_vector)
    prefs, eps = _constants(method, pref, m, float(norm_eps), float(reg_eps), grams.device)
    v = torch.ops.mmgrad.triton_dual_cone(grams.to(torch.float64).contiguous(), prefs, eps)
    return v.sum(dim=1)
