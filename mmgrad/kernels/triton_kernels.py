"""The ``triton`` backend: Triton kernels for the fused BOGC step (EMA and sample
estimators) and the Gram/combination of the MOO methods, on the flat M x N buffer.

Each program takes a block of coordinates and loops over the M objectives (unrolled:
``M`` is a compile-time constant); per-block partial statistics (norms, diagnostics,
the Gram matrix in float64) are written to a buffer and summed on the device, so a
step needs no host synchronisation for them. The element math mirrors
``csrc/mmgrad_math.h`` operation by operation (Triton cannot call C++), and every
kernel is tested against the float64 reference on CPU tensors under
``TRITON_INTERPRET=1``.

The second sweep over the objectives (shares and the weighted direction) recomputes
each objective's moments from the same block it has just read, which a GPU serves from
L1/L2: DRAM still sees one read of G and the state.

The pure element-wise functions (``ema_moments``, ``opinions``, ``ds_combine``,
``bogc_from_moments``) and the tiny M x M solves run the reference's code on the device.
"""

from __future__ import annotations

import os
from typing import Dict

import torch
import triton
import triton.language as tl

from .. import _validation as V
from .cpu import _parse_stats
from ..reference.bogc import finish_output, raw_output, bogc_from_moments, ds_combine, ema_moments, opinions  # noqa: F401
from ..reference.moo import mgda_weights, mimo_weights, mmpareto_weights  # noqa: F401  (host/device solves)

Tensor = torch.Tensor

__all__ = [  # the same functions as every backend; the element-wise ones and the solves are the reference's
    "bogc_from_moments", "bogc_sample_step", "bogc_step", "combine", "combine_and_gram", "ds_combine",
    "ema_moments", "gram", "mgda_weights", "mimo_weights", "mmpareto_weights", "opinions",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EVIDENCE_MAX = 1e30
SCALARS = 6  # sum_sq, out_sq, nonfinite, u_sum, conflict_sum, share_count (then shares M, Gram M*M)
_CONFIDENCE = {name: i for i, name in enumerate(V.CONFIDENCE_MODES)}
_WEIGHTS = {name: i for i, name in enumerate(V.WEIGHT_MODES)}

# Ampere/Hopper: large blocks keep enough bytes in flight; autotuned per M on the GPU.
_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (1024, 8), (2048, 8))]
_MIN_BLOCK = 4096 if INTERPRET else 512  # the interpreter pays per program, not per element


@triton.jit
def _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, k, n, S, offs, mask, beta, omb, ibc,
             M: tl.constexpr, SOURCE: tl.constexpr, STORE: tl.constexpr):
    """Objective k's mean and variance on a block (SPEC §3.1). SOURCE 0: EMA (state written
    when STORE; the update in float64 as the C++ kernels do); 1: S samples (S x M x N)."""
    if SOURCE == 0:
        g = tl.load(g_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
        gw = g.to(tl.float64)
        mw = beta * tl.load(m_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float64) + omb * gw
        vw = beta * tl.load(v_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float64) + omb * (gw * gw)
        if STORE:
            tl.store(mo_ptr + k * n + offs, mw.to(tl.float32), mask=mask)
            tl.store(vo_ptr + k * n + offs, vw.to(tl.float32), mask=mask)
        m_hat = mw * ibc
        d = vw * ibc - m_hat * m_hat
        var = tl.where(d > 0.0, d, 0.0).to(tl.float32)
        mu = g
    else:
        total = tl.zeros(offs.shape, dtype=tl.float32)
        for s in range(S):
            total += tl.load(g_ptr + (s * M + k) * n + offs, mask=mask, other=0.0).to(tl.float32)
        mu = total * (1.0 / S)
        sq = tl.zeros(offs.shape, dtype=tl.float32)
        for s in range(S):
            dev = tl.load(g_ptr + (s * M + k) * n + offs, mask=mask, other=0.0).to(tl.float32) - mu
            sq += dev * dev
        var = sq * (1.0 / (S - 1))
    return mu, var


@triton.jit
def _opinion(mu, var, gamma, eps, WEIGHTS: tl.constexpr):
    """SPEC §3.2-3.4 (mmgrad_math.h: precision, evidence, opinion) and the raw weight."""
    lam = tl.where((mu != 0.0) | (var != 0.0), 1.0 / (var + eps), 0.0)
    e = gamma * ((lam * mu) * mu)  # not mu^2: it overflows float32
    e = tl.where(e < 1e30, e, 1e30)  # kEvidenceMax; an overflow to inf clamps too
    strength = e + 2.0
    b = e / strength
    b_pos = tl.where(mu > 0.0, b, 0.0)
    b_neg = tl.where(mu < 0.0, b, 0.0)
    u = 2.0 / strength
    if WEIGHTS == 0:
        w = b_pos + b_neg
    else:
        w = lam
    return lam, b_pos, b_neg, u, w


@triton.jit
def _bogc_kernel(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, out_ptr, part_ptr, n, lo, hi, S,
                 beta, omb, ibc, gamma, eps,
                 M: tl.constexpr, SOURCE: tl.constexpr, CONFIDENCE: tl.constexpr, WEIGHTS: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = lo + pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hi
    bp = tl.zeros([BLOCK], dtype=tl.float64)  # the fold in float64, as mmgrad_math.h
    bn = tl.zeros([BLOCK], dtype=tl.float64)
    uu = tl.full([BLOCK], 1.0, tl.float64)
    kept = tl.full([BLOCK], 1.0, tl.float64)
    w_sum = tl.zeros([BLOCK], dtype=tl.float32)
    n_reach = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(M):  # SPEC §3.5: the fold (mmgrad_math.h: fold_objective)
        mu, var = _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, k, n, S, offs, mask, beta, omb, ibc, M, SOURCE, True)
        # counted on mu, as the reference does (a non-finite sample makes its mean non-finite)
        nonfinite += tl.where((mu == mu) & (tl.abs(mu) < float("inf")), 0.0, 1.0)
        lam, b_pos, b_neg, u, w = _opinion(mu, var, gamma, eps, WEIGHTS)
        b_pos = b_pos.to(tl.float64)
        b_neg = b_neg.to(tl.float64)
        u = u.to(tl.float64)
        n_reach += tl.where(lam > 0.0, 1.0, 0.0)
        w_sum += w
        total += mu.to(tl.float64)
        if k == 0:
            bp, bn, uu = b_pos, b_neg, u
        else:
            p = bp * b_pos + bp * u + b_pos * uu
            q = bn * b_neg + bn * u + b_neg * uu
            r = uu * u
            s = p + q + r
            conflict_all = s == 0.0
            inv = tl.where(conflict_all, 0.0, 1.0 / tl.where(conflict_all, 1.0, s))
            bp = p * inv
            bn = q * inv
            uu = tl.where(conflict_all, 1.0, uu * (u * inv))  # not r * inv: r underflows float32
            kept = kept * s
    weighted_mu = tl.zeros([BLOCK], dtype=tl.float32)
    row = part_ptr + pid * (SCALARS_C + M + M * M)
    for k in tl.static_range(M):  # shares w_k / sum(w) (one division each) and the direction
        mu, var = _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, k, n, S, offs, mask, beta, omb, ibc, M, SOURCE, False)
        lam, b_pos, b_neg, u, w = _opinion(mu, var, gamma, eps, WEIGHTS)
        share = tl.where(w_sum > 0.0, w / tl.where(w_sum > 0.0, w_sum, 1.0), 0.0)
        weighted_mu += share * mu
        tl.store(row + SCALARS_C + k, tl.sum(tl.where(mask, share, 0.0).to(tl.float64), axis=0))
        for j in tl.static_range(M):  # the Gram row k of this block, in float64
            if j >= k:
                if j == k:
                    other = mu
                elif SOURCE == 0:  # the EMA's mu is the gradient itself
                    other = tl.load(g_ptr + j * n + offs, mask=mask, other=0.0).to(tl.float32)
                else:
                    other, _v = _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, j, n, S, offs, mask, beta, omb, ibc, M, SOURCE, False)
                kk = tl.sum(tl.where(mask, mu.to(tl.float64) * other.to(tl.float64), 0.0), axis=0)
                tl.store(row + SCALARS_C + M + k * M + j, kk)
                tl.store(row + SCALARS_C + M + j * M + k, kk)
    if CONFIDENCE == 0:
        scale = tl.abs(bp - bn).to(tl.float32)
    elif CONFIDENCE == 1:
        scale = (bp + bn).to(tl.float32)  # = 1 - u, without cancellation when u ~ 1
    else:
        scale = tl.full([BLOCK], 1.0, tl.float32)
    res = scale * (n_reach * weighted_mu)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    res64 = res.to(tl.float64)
    tl.store(row + 0, tl.sum(tl.where(mask, total * total, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(mask, res64 * res64, 0.0), axis=0))
    tl.store(row + 2, tl.sum(tl.where(mask, nonfinite, 0.0).to(tl.float64), axis=0))
    tl.store(row + 3, tl.sum(tl.where(mask, uu, 0.0), axis=0))
    tl.store(row + 4, tl.sum(tl.where(mask, 1.0 - kept, 0.0), axis=0))
    tl.store(row + 5, tl.sum(tl.where(mask & (w_sum > 0.0), 1.0, 0.0).to(tl.float64), axis=0))


@triton.jit
def _combine_gram_kernel(g_ptr, alpha_ptr, out_ptr, part_ptr, n, lo, hi,
                         M: tl.constexpr, WITH_OUT: tl.constexpr, WITH_GRAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = lo + pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hi
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK], dtype=tl.float32)
    row = part_ptr + pid * (M * M + 1)
    for k in tl.static_range(M):
        x = tl.load(g_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
        nonfinite += tl.where((x == x) & (tl.abs(x) < float("inf")), 0.0, 1.0)
        if WITH_OUT:
            acc += tl.load(alpha_ptr + k).to(tl.float32) * x
        if WITH_GRAM:
            for j in tl.static_range(M):
                if j >= k:
                    y = tl.load(g_ptr + j * n + offs, mask=mask, other=0.0).to(tl.float32)
                    kk = tl.sum(tl.where(mask, x.to(tl.float64) * y.to(tl.float64), 0.0), axis=0)
                    tl.store(row + k * M + j, kk)
                    tl.store(row + j * M + k, kk)
    if WITH_OUT:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(row + M * M, tl.sum(tl.where(mask, nonfinite, 0.0).to(tl.float64), axis=0))


SCALARS_C = tl.constexpr(SCALARS)
_BOGC_KERNEL = _bogc_kernel if INTERPRET else triton.autotune(_CONFIGS, key=["M", "SOURCE"])(_bogc_kernel)
_COMBINE_KERNEL = _combine_gram_kernel if INTERPRET else triton.autotune(_CONFIGS, key=["M", "WITH_GRAM"])(_combine_gram_kernel)


def _check(name: str, t: object, dim: int) -> Tensor:
    t = V.check_float_tensor(name, t, dim=dim)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for backend='triton' (call .contiguous() on it)")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} must be a CUDA tensor for backend='triton'; got one on {t.device}")
    return t


def _launch(kernel, n_lo_hi, *args, **meta) -> None:
    lo, hi = n_lo_hi
    programs = max(1, triton.cdiv(hi - lo, _MIN_BLOCK))
    if INTERPRET:
        kernel[(programs,)](*args, BLOCK=_MIN_BLOCK, **meta)
    else:
        kernel[lambda m: (triton.cdiv(hi - lo, m["BLOCK"]),)](*args, **meta)


def _stats(parts: Tensor, m: int, groups: int, n: int) -> Dict[str, Tensor]:
    """Sum the per-block partials (on the device) into the CPU kernels' layout, then parse it."""
    tot = parts.sum(dim=1)  # groups x [scalars | shares | Gram]
    flat = torch.cat([tot[:, SCALARS + m :].reshape(-1), tot[:, :SCALARS].sum(0), tot[:, SCALARS : SCALARS + m].sum(0)])
    return _parse_stats(flat, m, groups, n)


def _bogc_launch(g, m_in, v_in, m_out, v_out, out, group_offsets, source, s_count, beta, step, gamma, eps, confidence, weights):
    mm, n = g.shape[-2], g.shape[-1]
    off = group_offsets.tolist()
    groups = len(off) - 1
    width = SCALARS + mm + mm * mm
    rows = max(max(1, triton.cdiv(b - a, _MIN_BLOCK)) for a, b in zip(off[:-1], off[1:]))
    parts = torch.zeros(groups, rows, width, dtype=torch.float64, device=g.device)
    ibc = 1.0 / (1.0 - beta**step) if source == 0 else 1.0
    for i, (a, b) in enumerate(zip(off[:-1], off[1:])):
        if b > a:
            _launch(_BOGC_KERNEL, (a, b), g, m_in, v_in, m_out, v_out, out, parts[i], n, a, b, s_count,
                    beta, 1.0 - beta, ibc, gamma, eps,
                    M=mm, SOURCE=source, CONFIDENCE=_CONFIDENCE[confidence], WEIGHTS=_WEIGHTS[weights])
    return _stats(parts, mm, groups, n)


def bogc_step(g, m, v, step, *, beta=0.9, gamma=1.0, eps=1e-8, confidence="belief", weights="belief",
              rescale=True, group_offsets=None, m_out=None, v_out=None, out=None):
    g = _check("g", g, 2)
    m, v = _check("m", m, 2), _check("v", v, 2)
    V.check_same_shape(("g", "m", "v"), (g, m, v))
    if m.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError(f"m and v must be torch.float32 for backend='triton'; got {m.dtype}, {v.dtype}")
    step, beta = V.check_step(step), V.check_beta(beta)
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, g.shape[1])
    m_out = torch.empty_like(m) if m_out is None else m_out
    v_out = torch.empty_like(v) if v_out is None else v_out
    out = torch.empty(g.shape[1], dtype=g.dtype, device=g.device) if out is None else out
    raw = raw_output(out)
    st = _bogc_launch(g, m, v, m_out, v_out, raw, off, 0, 1, beta, step, gamma, eps, confidence, weights)
    return finish_output(out, raw, st, rescale), m_out, v_out, st


def bogc_sample_step(samples, *, gamma=1.0, eps=1e-8, confidence="belief", weights="belief",
                     rescale=True, group_offsets=None, out=None):
    samples = _check("samples", samples, 3)
    if samples.shape[0] < 2:
        raise ValueError(f"samples needs S >= 2 along dim 0 for an unbiased variance; got S={samples.shape[0]}")
    gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
    off = V.check_group_offsets(group_offsets, samples.shape[2])
    out = torch.empty(samples.shape[2], dtype=samples.dtype, device=samples.device) if out is None else out
    raw = raw_output(out)
    st = _bogc_launch(samples, samples, samples, samples, samples, raw, off, 1, samples.shape[0], 0.0, 1, gamma, eps, confidence, weights)
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
    bounds = off.tolist()
    rows = max(max(1, triton.cdiv(b - lo, _MIN_BLOCK)) for lo, b in zip(bounds[:-1], bounds[1:]))
    parts = torch.zeros(groups, rows, mm * mm + 1, dtype=torch.float64, device=g.device)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            _launch(_COMBINE_KERNEL, (lo, hi), g, a[i], out, parts[i], n, lo, hi, M=mm, WITH_OUT=_with_out, WITH_GRAM=with_gram)
    tot = parts.sum(dim=1)
    res = {"nonfinite": tot[:, -1].sum().to(torch.int64)}
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
