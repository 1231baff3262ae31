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

The MOO weights of every group are solved by one program each (``moo_weights``, the
algorithm of csrc/mmgrad_math.h's solver). The pure element-wise functions
(``ema_moments``, ``opinions``, ``ds_combine``, ``bogc_from_moments``) and the per-group
host solves (``mgda_weights``, ...) have no kernel here: ``mmgrad.ops`` runs them on the
reference for CUDA tensors, and refuses ``backend="triton"`` for them. The argument checks are
``gpu_ops.GpuOps``, shared with the cuda backend; this module holds the kernels and
their launches.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from .. import _validation as V
from .._constants import CONFIDENCE_CODES, EVIDENCE_MAX, MOO_GAP_TOL, MOO_METHODS, NORMALIZE_CODES, WEIGHT_CODES
from .._constants import MOO_MAX_OBJECTIVES as _MOO_MAX_OBJECTIVES
from ..backends import triton_too_old, triton_version

_TOO_OLD = triton_too_old()
if _TOO_OLD:  # fail here, with the fix, never deep inside a kernel
    raise ImportError(f"mmgrad's Triton kernels: {_TOO_OLD}")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ..reference.finite import all_finite  # noqa: F401 - torch's fused multi-tensor max-norm: one launch
from . import stats as step_stats
from .gpu_ops import GpuOps

Tensor = torch.Tensor

#: what this backend computes in its own kernels (mmgrad.ops runs the rest on the reference)
__all__ = ["all_finite", "bogc_sample_step", "bogc_step", "bogc_step_gated", "combine", "combine_and_gram",
           "dual_cone_weights", "gram", "moo_weights"]
#: the backend's name in ``backend=``
NAME = "triton"
#: whether a step can run with no value read on the host (``sync_free=True``)
SYNC_FREE = True
#: the most objectives ``moo_weights`` solves (the solver holds a group's Gram in registers)
MOO_MAX_OBJECTIVES = _MOO_MAX_OBJECTIVES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Ampere/Hopper: one coordinate per thread, 8 warps. With 4 per thread the BOGC kernel
# spills registers from M = 4 on (its fold and Gram are float64), ptxas still spills a few
# bytes at 2 per thread, and 16 warps cap a thread at 128 registers, which M = 8 exceeds
# (tests/triton_compile.py builds every config at every M for sm_80 and sm_90 and fails on
# any spill). A list, so that a config found spill-free later can join the autotuning.
# maxnreg: left to itself, ptxas 13 aims at 80 registers here (3 blocks of 256 threads
# per SM) and spilled 4-8 bytes at M = 8; 128 (2 blocks) spills nowhere (make triton-check)
_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, maxnreg=r) for b, w, r in ((256, 8, 128),)]
# Triton before 3.9 (3.6 is torch 2.11's) needs ~200 registers for the BOGC kernel from
# M = 7 on, and spilled 84-192 bytes at 128: those builds get 255, one block per SM.
BOGC_WIDE_FROM_M = 7 if triton_version()[1] < (3, 9) else 1 << 30
_WIDE_CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, maxnreg=255) for c in _CONFIGS]


def bogc_configs(m: int) -> list:
    """The BOGC kernel's autotune configs at M objectives."""
    return _WIDE_CONFIGS if m >= BOGC_WIDE_FROM_M else _CONFIGS

# the smallest block: the partials buffers hold one row per program of it
_MIN_BLOCK = 4096 if INTERPRET else min(c.kwargs["BLOCK"] for c in _CONFIGS)
#: The BOGC and combination kernels unroll over M (the Gram is M*M): at M = 16 one build
#: takes ~3 minutes and spills, so they take M <= 8 per segment (backend="cuda": <= 64).
MAX_OBJECTIVES = 8
#: The sample estimator recomputes each objective's mean for its Gram row, and spills
#: from M = 8 on sm_80 and sm_90 (68 and 44 bytes): it takes M <= 4 per segment here.
SAMPLE_MAX_OBJECTIVES = 4


@triton.jit
def _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, k, n, S, offs, mask, store_mask, alpha, oma,
             M: tl.constexpr, SOURCE: tl.constexpr, STORE: tl.constexpr):
    """Objective k's mean and variance on a block (docs/spec.md §3.1). SOURCE 0: EMA (state
    ``mean, var`` written when STORE, where store_mask; mmgrad_math.h: ema_update, in
    float32, the state in its own dtype: float32 or bfloat16); 1: S samples (S x M x N)."""
    if SOURCE == 0:
        g = tl.load(g_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(m_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
        d = g - mean
        ad = alpha * d
        # (1-alpha)*alpha*d first: on step 1 (alpha = 1) it is 0 even where d*d overflows
        var = oma * tl.load(v_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32) + (oma * ad) * d
        if STORE:
            tl.store(mo_ptr + k * n + offs, _round_to(mean + ad, mo_ptr), mask=store_mask)
            tl.store(vo_ptr + k * n + offs, _round_to(var, vo_ptr), mask=store_mask)
        mu = g
    else:
        # while, not range(S): Triton 3.6's interpreter cannot index with a runtime scalar
        # under numpy >= 2.4 (int() of a 1-element array); the compiled loop is the same
        total = tl.zeros(offs.shape, dtype=tl.float32)
        s = 0
        while s < S:
            total += tl.load(g_ptr + (s * M + k) * n + offs, mask=mask, other=0.0).to(tl.float32)
            s += 1
        mu = total * (1.0 / S)
        sq = tl.zeros(offs.shape, dtype=tl.float32)
        s = 0
        while s < S:
            dev = tl.load(g_ptr + (s * M + k) * n + offs, mask=mask, other=0.0).to(tl.float32) - mu
            sq += dev * dev
            s += 1
        var = sq * (1.0 / (S - 1))
    return mu, var


@triton.jit
def _round_to(x, ptr):
    """float32 ``x`` in ``ptr``'s element type, bfloat16 rounded to nearest even by its bits
    (csrc/cpu/common.h: float_to_bf16_bits): compiled Triton rounds so, but its interpreter
    truncates, which doubled the bf16 state's drift in the tests (docs/testing.md). The
    state is finite when stored, so no NaN case is needed."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _opinion(mu, var, gamma, eps, WEIGHTS: tl.constexpr):
    """docs/spec.md §3.2-3.4 (mmgrad_math.h: precision, evidence, opinion) and the raw weight."""
    lam = tl.where((mu != 0.0) | (var != 0.0), 1.0 / (var + eps), 0.0)
    e = gamma * ((lam * mu) * mu)  # not mu^2: it overflows float32
    e = tl.where(e < EVIDENCE_MAX_C, e, EVIDENCE_MAX_C)  # an overflow to inf clamps too
    inv_strength = 1.0 / (e + 2.0)  # one division for b and u, as mmgrad_math.h
    b = e * inv_strength
    b_pos = tl.where(mu > 0.0, b, 0.0)
    b_neg = tl.where(mu < 0.0, b, 0.0)
    u = 2.0 * inv_strength
    if WEIGHTS == 0:
        w = b_pos + b_neg
    else:
        w = lam
    return lam, b_pos, b_neg, u, w


@triton.jit
def _wide_mul(mant, exp, x):
    """(mant * 2^exp) * x for mant in [1, 2), x in [2^-100, 1], as a mantissa in [1, 2) and
    an int exponent (mmgrad_math.h: wide_mul): the product of opinions' u cannot flush."""
    bits = (mant * x).to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 127
    return ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True), exp + e


@triton.jit
def _pow2(k):
    """2^k for int k <= 0; 0 below float32's normal range (mmgrad_math.h: pow2)."""
    biased = tl.maximum(k + 127, 0).to(tl.uint32)
    return tl.where(k <= -127, 0.0, (biased << 23).to(tl.float32, bitcast=True))


@triton.jit
def _bogc_kernel(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, out_ptr, part_ptr, n, lo, hi, S,
                 commit_ptr, alpha_ptr, gamma, eps,
                 M: tl.constexpr, SOURCE: tl.constexpr, CONFIDENCE: tl.constexpr, WEIGHTS: tl.constexpr,
                 BLOCK: tl.constexpr):
    # 64-bit offsets: row * n and program * BLOCK pass 2**31 on large buffers although
    # n itself fits in 32 bits (tests/test_triton_compile.py reads the compiled IR)
    n = tl.cast(n, tl.int64)
    pid = tl.program_id(0).to(tl.int64)
    offs = lo + pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hi
    if SOURCE == 0:
        # The commit flag and the EMA's weight come from the device, so the sync-free
        # calibrator updates its one slot of EMA state in place only when the step is
        # finite, without the host knowing which it is (docs/spec.md §7).
        store_mask = mask & ((offs * 0 + tl.load(commit_ptr)) != 0)  # a block of flags: the interpreter masks no scalars
        alpha = tl.load(alpha_ptr).to(tl.float32)
        oma = tl.load(alpha_ptr + 1).to(tl.float32)
    else:
        store_mask = mask
        alpha = 1.0
        oma = 0.0
    # The fold in float32 (docs/spec.md, decision 12; mmgrad_math.h: fold_objective): each
    # opinion supports one sign, so it is the positive and the negative objectives'
    # products U+-, each a mantissa and an exponent, and their beliefs B+- = 1 - U+-.
    bp = tl.zeros([BLOCK], dtype=tl.float32)
    bn = tl.zeros([BLOCK], dtype=tl.float32)
    mp = tl.full([BLOCK], 1.0, tl.float32)
    mn = tl.full([BLOCK], 1.0, tl.float32)
    ep = tl.zeros([BLOCK], dtype=tl.int32)
    en = tl.zeros([BLOCK], dtype=tl.int32)
    w_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(M):  # docs/spec.md §3.5: the fold (mmgrad_math.h: fold_objective)
        mu, var = _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, k, n, S, offs, mask, store_mask, alpha, oma, M, SOURCE, False)
        lam, b_pos, b_neg, u, w = _opinion(mu, var, gamma, eps, WEIGHTS)
        w_sum += w
        u_pos = tl.where(mu > 0.0, u, 1.0)
        u_neg = tl.where(mu < 0.0, u, 1.0)
        bp = b_pos + bp * u_pos
        bn = b_neg + bn * u_neg
        mp, ep = _wide_mul(mp, ep, u_pos)
        mn, en = _wide_mul(mn, en, u_neg)
    # the fused opinion, one division (mmgrad_math.h: fused_opinion): lo, hi the smaller
    # and larger of U+-, all divided by 2^exp(hi); its statistics are stored at once, so
    # that only the confidence stays live through the second pass (fewer registers)
    pos_lo = (ep < en) | ((ep == en) & (mp <= mn))
    b_lo = tl.where(pos_lo, bp, bn)
    b_hi = tl.where(pos_lo, bn, bp)
    hi_exp = tl.where(pos_lo, en, ep)
    a_lo = tl.where(pos_lo, mp, mn) * _pow2(tl.where(pos_lo, ep, en) - hi_exp)
    c_hi = tl.where(pos_lo, mn, mp)
    inv = 1.0 / (c_hi + a_lo * b_hi)
    f_lo = (b_lo * c_hi) * inv
    f_hi = (b_hi * a_lo) * inv
    if CONFIDENCE == 0:
        scale = tl.abs(f_lo - f_hi)
    elif CONFIDENCE == 1:
        scale = f_lo + f_hi  # = 1 - u, without cancellation when u ~ 1
    else:
        scale = tl.full([BLOCK], 1.0, tl.float32)
    row = part_ptr + pid * (ST_SHARES + M + M * M)  # one stats.py vector per block
    fused_u = ((a_lo * c_hi) * _pow2(hi_exp)) * inv
    tl.store(row + ST_U_SUM, tl.sum(tl.where(mask, fused_u, 0.0).to(tl.float64), axis=0))
    tl.store(row + ST_CONFLICT_SUM, tl.sum(tl.where(mask, bp * bn, 0.0).to(tl.float64), axis=0))  # the conflict mass
    tl.store(row + ST_SHARE_COUNT, tl.sum(tl.where(mask & (w_sum > 0.0), 1.0, 0.0).to(tl.float64), axis=0))
    weighted_mu = tl.zeros([BLOCK], dtype=tl.float32)
    n_reach = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(M):  # shares w_k / sum(w) (one division each) and the direction
        # the state is written on this last read of it, so it may be updated in place (one slot)
        mu, var = _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, k, n, S, offs, mask, store_mask, alpha, oma, M, SOURCE, True)
        # counted on mu, as the reference does (a non-finite sample makes its mean non-finite)
        nonfinite += tl.where((mu == mu) & (tl.abs(mu) < float("inf")), 0.0, 1.0)
        lam, b_pos, b_neg, u, w = _opinion(mu, var, gamma, eps, WEIGHTS)
        n_reach += tl.where(lam > 0.0, 1.0, 0.0)
        total += mu.to(tl.float64)
        share = tl.where(w_sum > 0.0, w / tl.where(w_sum > 0.0, w_sum, 1.0), 0.0)
        weighted_mu += share * mu
        tl.store(row + ST_SHARES + k, tl.sum(tl.where(mask, share, 0.0).to(tl.float64), axis=0))
        for j in tl.static_range(M):  # the Gram row k of this block, in float64
            if j >= k:
                if j == k:
                    other = mu
                elif SOURCE == 0:  # the EMA's mu is the gradient itself
                    other = tl.load(g_ptr + j * n + offs, mask=mask, other=0.0).to(tl.float32)
                else:
                    other, _v = _moments(g_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr, j, n, S, offs, mask, store_mask, alpha, oma, M, SOURCE, False)
                kk = tl.sum(tl.where(mask, mu.to(tl.float64) * other.to(tl.float64), 0.0), axis=0)
                tl.store(row + ST_SHARES + M + k * M + j, kk)
                tl.store(row + ST_SHARES + M + j * M + k, kk)
    res = scale * (n_reach * weighted_mu)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    res64 = res.to(tl.float64)
    tl.store(row + ST_SUM_SQ, tl.sum(tl.where(mask, total * total, 0.0), axis=0))
    tl.store(row + ST_OUT_SQ, tl.sum(tl.where(mask, res64 * res64, 0.0), axis=0))
    tl.store(row + ST_NONFINITE, tl.sum(tl.where(mask, nonfinite, 0.0).to(tl.float64), axis=0))


@triton.jit
def _combine_gram_kernel(g_ptr, alpha_ptr, out_ptr, part_ptr, n, lo, hi,
                         M: tl.constexpr, WITH_OUT: tl.constexpr, WITH_GRAM: tl.constexpr, BLOCK: tl.constexpr):
    """Grid-stride over [lo, hi): program p takes blocks p, p + P, ... and its threads keep
    every pair's float64 products (a tuple of M(M+1)/2 per-thread sums) across them, each
    row read once a block; one block reduction per pair at the end, as the CUDA kernel."""
    n = tl.cast(n, tl.int64)  # 64-bit offsets, as in _bogc_kernel
    pid = tl.program_id(0).to(tl.int64)
    stride = tl.num_programs(0).to(tl.int64) * BLOCK
    PAIRS: tl.constexpr = M * (M + 1) // 2 if WITH_GRAM else 1
    gram = (tl.zeros([BLOCK], dtype=tl.float64),) * PAIRS
    nonfinite = tl.zeros([BLOCK], dtype=tl.float32)
    weights = ()
    for k in tl.static_range(M):
        weights = weights + ((tl.load(alpha_ptr + k).to(tl.float32) if WITH_OUT else 0.0),)
    start = lo + pid * BLOCK
    while start < hi:  # not range(): Triton 3.6's interpreter cannot take its runtime bounds (see _moments)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        rows = ()
        for k in tl.static_range(M):
            x = tl.load(g_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
            nonfinite += tl.where((x == x) & (tl.abs(x) < float("inf")), 0.0, 1.0)
            if WITH_OUT:
                acc += weights[k] * x
            rows = rows + (x.to(tl.float64),)  # masked lanes read 0: they add nothing below
        if WITH_OUT:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if WITH_GRAM:
            summed = ()  # the pairs (i, j), i <= j, in order: pair p is gram[p]
            for i in tl.static_range(M):
                for j in tl.static_range(i, M):
                    summed = summed + (gram[len(summed)] + rows[i] * rows[j],)
            gram = summed
        start += stride
    row = part_ptr + pid * (M * M + 1)
    if WITH_GRAM:
        for i in tl.static_range(M):
            for j in tl.static_range(i, M):
                kk = tl.sum(gram[0], axis=0)  # the pairs in the same order, taken from the front
                gram = gram[1:]
                tl.store(row + i * M + j, kk)
                tl.store(row + j * M + i, kk)
    tl.store(row + M * M, tl.sum(nonfinite.to(tl.float64), axis=0))


# the offsets of the statistics vector (stats.py, csrc/mmgrad_math.h StatsLayout)
ST_SUM_SQ, ST_OUT_SQ, ST_NONFINITE, ST_U_SUM, ST_CONFLICT_SUM, ST_SHARE_COUNT = (
    tl.constexpr(step_stats.OFFSET[name]) for name in step_stats.SCALARS)
ST_SHARES = tl.constexpr(step_stats.SHARES)
EVIDENCE_MAX_C = tl.constexpr(EVIDENCE_MAX)
_BOGC_KERNEL = _bogc_kernel if INTERPRET else triton.autotune(_CONFIGS, key=["M", "SOURCE"])(_bogc_kernel)
_BOGC_KERNEL_WIDE = _bogc_kernel if INTERPRET else triton.autotune(_WIDE_CONFIGS, key=["M", "SOURCE"])(_bogc_kernel)
_COMBINE_KERNEL = _combine_gram_kernel if INTERPRET else triton.autotune(_CONFIGS, key=["M", "WITH_GRAM"])(_combine_gram_kernel)


_UNCAPPED = 1 << 62


def _launch(kernel, n_lo_hi, *args, cap: Optional[int] = None, **meta) -> None:
    """One program per block of [lo, hi), or at most ``cap`` programs (a grid-stride kernel)."""
    lo, hi = n_lo_hi
    cap = cap or _UNCAPPED
    if INTERPRET:
        kernel[(min(max(1, triton.cdiv(hi - lo, _MIN_BLOCK)), cap),)](*args, BLOCK=_MIN_BLOCK, **meta)
    else:
        wrap_triton(kernel)[lambda m: (min(triton.cdiv(hi - lo, m["BLOCK"]), cap),)](*args, **meta)


def grid_stride_programs(device: torch.device) -> int:
    """The programs of a grid-stride launch: 8 per SM, as many as the CUDA kernels launch
    (2 under the interpreter, so that its tests take several blocks per program)."""
    return 2 if INTERPRET else 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows(bounds: List[int], cap: Optional[int] = None) -> int:
    return max(min(max(1, triton.cdiv(b - a, _MIN_BLOCK)), cap or _UNCAPPED) for a, b in zip(bounds[:-1], bounds[1:]))


def _operator(name: str, mutates_args, fake):
    """Register a launcher as operator ``mmgrad::name``: a ``triton_op`` on a GPU, so
    torch.compile sees the kernels inside it. Under the interpreter ``wrap_triton`` hands
    back the plain kernel, which no tracer can follow, so there the same schema is an
    opaque ``custom_op`` with ``fake`` giving its output (what opcheck then checks)."""
    def register(fn):
        if not INTERPRET:
            return triton_op(f"mmgrad::{name}", mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(f"mmgrad::{name}", mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        return op
    return register


def _partials(like: Tensor, bounds: List[int], width: int, cap: Optional[int] = None) -> Tensor:
    """Per-group, per-program partial statistics (float64), summed later on the device; a
    grid-stride launch (``cap`` programs at most) fills fewer rows, the rest stay 0."""
    return torch.zeros(len(bounds) - 1, _rows(bounds, cap), width, dtype=torch.float64, device=like.device)


def _bogc_width(g: Tensor) -> int:
    return step_stats.width(g.shape[-2])


def _fake_bogc(g, mean, var, mean_out, var_out, raw, group_offsets, *rest):
    return _partials(g, group_offsets, _bogc_width(g))


def _fake_combine(g, alpha, out, group_offsets, with_gram):
    return _partials(g, group_offsets, g.shape[0] ** 2 + 1, grid_stride_programs(g.device))


def _fake_moo(grams, *rest):
    return grams.new_empty(grams.shape[0], grams.shape[1], dtype=torch.float64)


# Group offsets travel as int lists: the host loops over groups at trace time.
@_operator("triton_bogc", {"mean", "var", "mean_out", "var_out", "raw"}, _fake_bogc)
def _bogc_op(g: Tensor, mean: Tensor, var: Tensor, mean_out: Tensor, var_out: Tensor, raw: Tensor,
             group_offsets: List[int], samples: int, alpha: Tensor, commit: Optional[Tensor], gamma: float, eps: float,
             confidence: int, weights: int, in_place: bool) -> Tensor:
    """One BOGC step's launches over every group; returns the per-block partials
    ``G x blocks x [6 | M | M*M]``. ``in_place``: the state ``mean``, ``var`` is updated
    where ``commit`` is non-zero (the sync-free step) and ``mean_out``, ``var_out`` are
    unused (mutable arguments may not be None under torch.compile); ``alpha`` holds the
    EMA's ``(alpha, 1 - alpha)`` on the device; ``samples`` > 0: ``g`` is ``S x M x N``."""
    mm, n = g.shape[-2], g.shape[-1]
    bounds = group_offsets
    parts = _partials(g, bounds, _bogc_width(g))
    # the host-driven step always commits
    commit = torch.ones((), dtype=torch.int64, device=g.device) if commit is None else commit
    m_out, v_out = (mean, var) if in_place else (mean_out, var_out)
    kernel = _BOGC_KERNEL_WIDE if mm >= BOGC_WIDE_FROM_M else _BOGC_KERNEL
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            _launch(kernel, (a, b), g, mean, var, m_out, v_out, raw, parts[i], n, a, b, max(samples, 1),
                    commit, alpha, gamma, eps, M=mm, SOURCE=1 if samples else 0, CONFIDENCE=confidence, WEIGHTS=weights)
    return parts


@_operator("triton_combine", {"out"}, _fake_combine)
def _combine_op(g: Tensor, alpha: Optional[Tensor], out: Tensor, group_offsets: List[int],
                with_gram: bool) -> Tensor:
    """``out = alpha_G^T g`` per group (without ``alpha``: the Gram alone, ``out`` unused);
    returns the per-block partials ``G x blocks x [M*M | 1]`` (Gram, non-finite count)."""
    mm, n = g.shape
    bounds = group_offsets
    cap = grid_stride_programs(g.device)
    parts = _partials(g, bounds, mm * mm + 1, cap)
    with_out = alpha is not None
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            _launch(_COMBINE_KERNEL, (lo, hi), g, alpha[i] if with_out else g, out if with_out else g, parts[i], n, lo, hi,
                    cap=cap, M=mm, WITH_OUT=with_out, WITH_GRAM=with_gram)
    return parts


def _launch_bogc(g, mean_in, var_in, mean_out, var_out, raw, off, samples, alpha, commit, gamma, eps, confidence, weights):
    in_place = mean_out is mean_in  # the gated step: one slot, updated where commit says
    alpha = torch.stack([torch.as_tensor(a, dtype=torch.float64, device=g.device).reshape(()) for a in alpha])
    unused = g.new_empty(0, dtype=torch.float32)
    return torch.ops.mmgrad.triton_bogc(g, mean_in, var_in, unused if in_place else mean_out,
                                        unused.clone() if in_place else var_out, raw, off.tolist(), samples, alpha,
                                        commit, gamma, eps, CONFIDENCE_CODES[confidence], WEIGHT_CODES[weights], in_place)


def _launch_combine(g, alpha, out, off, with_gram):
    return torch.ops.mmgrad.triton_combine(g, alpha, g.new_empty(0) if out is None else out, off.tolist(), with_gram)


# ---------------------------------------------------------------- the M x M solve, on the device
#: The solver of csrc/mmgrad_math.h, step for step (its comments and docs/solver.md argue
#: the bound): the Mizuno-Todd-Ye predictor-corrector interior-point method, stopped at
#: MOO_GAP_TARGET or after MOO_ITERATIONS (the proof's bound at M = 16).
MOO_ITERATIONS = 150
MOO_BISECTIONS = 30
MOO_GAP_TARGET = MOO_GAP_TOL / 8  # where the solver stops: margin for the caller's rounding
_MOO_WIDE = tl.constexpr(0.5)  # the predictor's neighbourhood ||a s - mu|| <= 0.5 mu (the corrector's is 0.25)


@triton.jit
def _moo_gap(K, a, act):
    """a^T K a - min_{i active} (K a)_i: docs/spec.md §4's duality gap."""
    g = tl.sum(K * a[None, :], axis=1)
    return tl.sum(a * g, axis=0) - tl.min(tl.where(act, g, float("inf")), axis=0)


@triton.jit
def _newton_matrix(K, act, idx, a, s):
    """K + diag(s/a) on the active objectives (SPD where a, s > 0), the identity outside
    them, so a solve leaves da_i = 0 there."""
    a_safe = tl.where(act, a, 1.0)
    eye = idx[:, None] == idx[None, :]
    h = tl.where(act[:, None] & act[None, :], K, 0.0)
    return h + tl.where(eye, tl.where(act, s / a_safe, 1.0)[:, None], 0.0)


@triton.jit
def _gauss_jordan(h, u, v, idx, M: tl.constexpr):
    """h^-1 u and h^-1 v for a symmetric positive definite h (positive pivots: no pivoting)."""
    for k in range(M):  # a loop, not unrolled: Triton 3.6 spilled the unrolled elimination at M = 16
        at_k = idx == k
        row = tl.sum(tl.where(at_k[:, None], h, 0.0), axis=0)
        col = tl.where(at_k, 0.0, tl.sum(tl.where(at_k[None, :], h, 0.0), axis=1))
        inv = 1.0 / tl.sum(tl.where(at_k, row, 0.0), axis=0)
        row = row * inv
        u_k = tl.sum(tl.where(at_k, u, 0.0), axis=0) * inv
        v_k = tl.sum(tl.where(at_k, v, 0.0), axis=0) * inv
        h = tl.where(at_k[:, None], row[None, :], h - col[:, None] * row[None, :])
        u = tl.where(at_k, u_k, u - col * u_k)
        v = tl.where(at_k, v_k, v - col * v_k)
    return u, v


@triton.jit
def _moo_newton(K, act, idx, a, s, target, M: tl.constexpr):
    """A Newton step towards a_i s_i = target on the simplex: u = H^-1 (target/a - s),
    v = H^-1 1 with H = K + diag(s/a) (SPD); da = u + dl v, 1^T da = 0."""
    h = _newton_matrix(K, act, idx, a, s)
    u = tl.where(act, target / tl.where(act, a, 1.0) - s, 0.0)
    v = tl.where(act, 1.0, 0.0).to(tl.float64)
    u, v = _gauss_jordan(h, u, v, idx, M)
    dl = -tl.sum(u, axis=0) / tl.sum(v, axis=0)
    da = u + dl * v
    ds = tl.where(act, tl.sum(K * da[None, :], axis=1) - dl, 0.0)
    return da, dl, ds


@triton.jit
def _moo_in_wide(a, s, da, ds, t, act, n):
    """Whether a + t da, s + t ds stay positive and inside ||a s - mu|| <= 0.5 mu."""
    at = a + t * da
    st = s + t * ds
    bad = tl.sum(tl.where(act & ((at <= 0.0) | (st <= 0.0)), 1.0, 0.0), axis=0)
    p = tl.where(act, at * st, 0.0)
    mu = tl.sum(p, axis=0) / n
    dev = tl.sum(tl.where(act, (p - mu) * (p - mu), 0.0), axis=0)
    return (bad == 0.0) & (dev <= _MOO_WIDE * _MOO_WIDE * mu * mu)


@triton.jit
def _moo_predictor_length(a, s, da, ds, act, n, BISECTIONS: tl.constexpr):
    """1 if the full predictor step stays in the wide neighbourhood, else bisection."""
    lo = n * 0.0  # float64 scalars
    hi = lo + 1.0
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        inside = _moo_in_wide(a, s, da, ds, mid, act, n)
        lo = tl.where(inside, mid, lo)
        hi = tl.where(inside, hi, mid)
    return tl.where(_moo_in_wide(a, s, da, ds, hi * 0.0 + 1.0, act, n), hi * 0.0 + 1.0, lo)


@triton.jit
def _min_norm_weights(K, act, idx, TARGET, M: tl.constexpr, MB: tl.constexpr, ITERS: tl.constexpr,
                      BISECTIONS: tl.constexpr):
    """argmin_{a in simplex over act} a^T K a, K scaled to max K_mm = 1 (mmgrad_math.h's moo_min_norm)."""
    TARGET = tl.cast(TARGET, tl.float64)  # a float argument is fp32 on the GPU; the gap is fp64
    n = tl.sum(act.to(tl.float64), axis=0)
    a = tl.where(act, 1.0 / tl.maximum(n, 1.0), 0.0)
    # two objectives: the closed form, as the host's
    first = tl.min(tl.where(act, idx, MB), axis=0)
    second = tl.min(tl.where(act & (idx != first), idx, MB), axis=0)
    row_i = tl.sum(tl.where((idx == first)[:, None], K, 0.0), axis=0)
    row_j = tl.sum(tl.where((idx == second)[:, None], K, 0.0), axis=0)
    kii = tl.sum(tl.where(idx == first, row_i, 0.0), axis=0)
    kij = tl.sum(tl.where(idx == second, row_i, 0.0), axis=0)
    kjj = tl.sum(tl.where(idx == second, row_j, 0.0), axis=0)
    denom = kii + kjj - 2.0 * kij
    t2 = tl.where(denom > 0.0, (kjj - kij) / tl.where(denom > 0.0, denom, 1.0), 0.5)
    t2 = tl.minimum(tl.maximum(t2, 0.0), 1.0)
    pair = tl.where(idx == first, t2, tl.where(idx == second, 1.0 - t2, 0.0))
    # the central path's neighbourhood: lambda below min (K a) by 8 sqrt(n)
    lam = tl.min(tl.where(act, tl.sum(K * a[None, :], axis=1), float("inf")), axis=0) - 8.0 * tl.sqrt(n)
    gap = tl.where(n == 2.0, 0.0, _moo_gap(K, a, act))
    it = 0
    while (it < ITERS) & (gap > TARGET):
        it += 1
        s = tl.where(act, tl.sum(K * a[None, :], axis=1) - lam, 0.0)
        da, dl, ds = _moo_newton(K, act, idx, a, s, lam * 0.0, M)
        t = _moo_predictor_length(a, s, da, ds, act, n, BISECTIONS)
        a = a + t * da
        lam = lam + t * dl
        s = tl.where(act, tl.sum(K * a[None, :], axis=1) - lam, 0.0)
        da, dl, ds = _moo_newton(K, act, idx, a, s, tl.sum(a * s, axis=0) / n, M)
        a = a + da
        lam = lam + dl
        gap = _moo_gap(K, a, act)
    a = tl.where(act & (a > 0.0), a, 0.0)
    return tl.where(n == 2.0, pair, a / tl.maximum(tl.sum(a, axis=0), 1e-300))  # 1^T a = 1 to rounding


@triton.jit
def _moo_weights_kernel(k_ptr, loss_ptr, w_ptr, magnitude, TARGET,
                        M: tl.constexpr, MB: tl.constexpr, METHOD: tl.constexpr, NORMALIZE: tl.constexpr,
                        ITERS: tl.constexpr, BISECTIONS: tl.constexpr):
    """One program per parameter group: its Gram matrix in registers, the weights out."""
    grp = tl.program_id(0)
    idx = tl.arange(0, MB)
    valid = idx < M
    both = valid[:, None] & valid[None, :]
    K = tl.load(k_ptr + grp * M * M + idx[:, None] * M + idx[None, :], mask=both, other=0.0).to(tl.float64)
    eye = idx[:, None] == idx[None, :]
    diag = tl.sum(tl.where(eye, K, 0.0), axis=1)
    act = valid & (diag > 0.0)  # an objective that does not reach the group: weight 0
    n_act = tl.sum(act.to(tl.float64), axis=0)
    uniform = tl.where(act, 1.0 / tl.maximum(n_act, 1.0), 0.0)
    if METHOD == 0:  # mgda, on the normalised gradients g_m / s_m
        if NORMALIZE == 1:
            s = tl.sqrt(tl.where(act, diag, 1.0))
        elif NORMALIZE == 2:
            s = tl.load(loss_ptr + idx, mask=valid, other=1.0).to(tl.float64)
        else:
            s = tl.full([MB], 1.0, tl.float64)
        s = tl.where(act, s, 1.0)
        kn = K / (s[:, None] * s[None, :])
        top = tl.max(tl.where(act, tl.sum(tl.where(eye, kn, 0.0), axis=1), 0.0), axis=0)
        kn = kn / tl.where(top > 0.0, top, 1.0)  # scale-free, so TOL is relative to max K_mm
        a = _min_norm_weights(kn, act, idx, TARGET, M, MB, ITERS, BISECTIONS)
        even = tl.full([MB], 1.0, tl.float64) / M  # K = 0: uniform, in float64
        w = tl.where(n_act > 0.0, a, tl.where(valid, even, 0.0))
    else:  # mmpareto: uniform if every pair agrees, else MGDA; then the magnitude rule
        tl.static_assert(METHOD == 1, "unknown MOO method code (0: mgda, 1: mmpareto)")
        d = tl.sqrt(tl.where(act, diag, 1.0))
        pair = act[:, None] & act[None, :]
        disagree = tl.sum(tl.sum(tl.where(pair & (K / (d[:, None] * d[None, :]) <= 0.0), 1.0, 0.0), axis=1), axis=0)
        top = tl.max(tl.where(act, diag, 0.0), axis=0)
        a = _min_norm_weights(K / tl.where(top > 0.0, top, 1.0), act, idx, TARGET, M, MB, ITERS, BISECTIONS)
        alpha = tl.where(disagree > 0.0, a, uniform)
        c = n_act * alpha
        c_sq = tl.sum(c * tl.sum(K * c[None, :], axis=1), axis=0)
        sum_sq = tl.sum(tl.sum(tl.where(pair, K, 0.0), axis=1), axis=0)
        boost = tl.where(c_sq > 0.0, tl.maximum(tl.sqrt(sum_sq / tl.where(c_sq > 0.0, c_sq, 1.0)), 1.0), 1.0)
        w = tl.where(n_act > 0.0, c * boost * magnitude, 0.0)
    tl.store(w_ptr + grp * M + idx, w, mask=valid)


def moo_warps(mb: int) -> int:
    """Warps for the solver of an MB x MB Gram: 16 at MB = 16 (4 and 8 spill its float64 matrix)."""
    return 16 if mb >= 16 else 4


#: Registers per thread for the solver: left to itself ptxas aims at 64-80 and spills its
#: Newton matrix; 128 fits 16 warps in one SM's register file (make triton-check).
MOO_MAXNREG = 128


@_operator("triton_moo_weights", (), _fake_moo)
def _moo_op(grams: Tensor, method: int, normalize: int, losses: Tensor, magnitude: float) -> Tensor:
    """The ``G x M`` weights of MOO method ``method`` (index in ``MOO_METHODS``) from
    ``G x M x M`` float64 Gram matrices, one program per group."""
    if method not in range(len(MOO_METHODS)) or normalize not in NORMALIZE_CODES.values():
        raise ValueError(f"method code {method} / normalize code {normalize}: the solver knows methods "
                         f"{dict(enumerate(MOO_METHODS))} and normalize 0-2")
    groups, mm = grams.shape[0], grams.shape[1]
    w = torch.empty(groups, mm, dtype=torch.float64, device=grams.device)
    mb = max(2, triton.next_power_of_2(mm))
    kernel = _moo_weights_kernel if INTERPRET else wrap_triton(_moo_weights_kernel)
    kernel[(groups,)](grams, losses, w, magnitude, MOO_GAP_TARGET, M=mm, MB=mb, METHOD=method,
                      NORMALIZE=normalize, ITERS=MOO_ITERATIONS, BISECTIONS=MOO_BISECTIONS,
                      num_warps=moo_warps(mb), maxnreg=MOO_MAXNREG)
    return w


def _launch_moo(grams, method, normalize, losses, magnitude):
    return torch.ops.mmgrad.triton_moo_weights(grams, method, normalize, losses, magnitude)


_OPS = GpuOps("triton", lambda device: device.type == "cuda" or INTERPRET, _launch_bogc, _launch_combine, _launch_moo,
              state_dtypes=(torch.float32, torch.bfloat16), max_objectives=MAX_OBJECTIVES,
              max_sample_objectives=SAMPLE_MAX_OBJECTIVES)
bogc_step = _OPS.bogc_step
bogc_step_gated = _OPS.bogc_step_gated
bogc_sample_step = _OPS.bogc_sample_step
combine_and_gram = _OPS.combine_and_gram
combine = _OPS.combine
gram = _OPS.gram
moo_weights = _OPS.moo_weights

from . import triton_dual_cone  # noqa: E402,F401 - registers mmgrad::triton_dual_cone with the others


def __getattr__(name: str):
    """``dual_cone_weights``, from its own module, which imports this one's solver steps
    (looked up late: when that module is imported first, it is not defined yet here)."""
    if name == "dual_cone_weights":
        from .triton_dual_cone import dual_cone_weights

        return dual_cone_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
