"""``python -m mmgrad verify``: every available backend against the float64 reference.

Fresh random inputs each run (seeded from the clock unless ``--seed``), with the cases
that broke first readings of the spec mixed in: coordinates an objective does not reach
(g = 0 with zero state), sigma^2 = 0, confident opposite objectives. Prints the max
relative error per function and dtype and exits non-zero when one exceeds its tolerance.

The error is normwise: ``max|x - ref| / max|ref|`` (an element-wise ratio is meaningless
where the reference is 0); for beliefs, uncertainties and shares, which lie in [0, 1],
it is the absolute error.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .. import ops, reference
from ..backends import backends
from . import describe

Tensor = torch.Tensor

# Tolerances on the normwise relative error (issue: CPU kernels): the kernels compute in
# float32 for float32/bf16/fp16 gradients; half outputs are rounded to the half dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def stable_floor(mu: Tensor) -> float:
    """The backward-stable error scale of a BOGC output (docs/spec.md, decision 15): it is a
    weighted sum of the M rows of ``mu`` (``M x N``, or ``S x M x N`` samples), so where it
    cancels its natural bound is eps * M * max|mu|, not eps * |output|; for ``rel_err(..., floor)``."""
    return mu.shape[-2] * float(mu.detach().to("cpu", torch.float64).abs().max())


def ema_floor(g: Tensor, mean: Tensor) -> float:
    """The backward-stable error scale of the EMA's new mean ``mean + alpha (g - mean)`` in
    float32: where it cancels to far less than its terms (one coordinate at N = 1: seed
    2110734736 gave 1.25e-6 of a mean of 0.0018), its bound is a few eps * max(|g|, |mean|),
    not eps * |new mean|; for ``rel_err(..., floor)``."""
    return max(float(t.detach().to("cpu", torch.float64).abs().max()) for t in (g, mean))


def norm_sq_floor(out_sq: Tensor, mu: Tensor) -> float:
    """The backward-stable floor for ``||out||^2`` (docs/spec.md, decision 15): each output
    coordinate may err by about eps * M * max_m |mu_m| where the fused beliefs nearly tie,
    so ``||out||^2`` by ``2 ||out|| M ||max_m |mu_m|| ||``; for ``rel_err(..., floor)``."""
    per = mu.detach().to("cpu", torch.float64).abs().reshape(-1, mu.shape[-1]).amax(0).norm()
    return 2.0 * float(out_sq) ** 0.5 * mu.shape[-2] * float(per)


def combine_floor(g: Tensor, alpha: Tensor, group_offsets: Tensor) -> float:
    """The backward-stable error scale of ``combine``: a coordinate's sum of M terms can
    cancel to nothing (one coordinate at N = 1), so its bound is eps * M * sum_m |alpha_m g_m|;
    for ``rel_err(..., floor)``."""
    g64 = g.detach().to("cpu", torch.float64).abs()
    return float(reference.combine(g64, alpha.detach().to("cpu", torch.float64).abs(), group_offsets=group_offsets).max())


ILL_CONDITIONED_KINDS = ("spread norms", "near-duplicate", "near-opposite", "rank one plus noise", "norms over 16 decades",
                         "duplicated halves")


def ill_conditioned_gram(seed: int, m: int, kind: str) -> Tensor:
    """An M x M float64 Gram of one of ``ILL_CONDITIONED_KINDS``, the Grams of imbalanced
    objectives: near-singular, rank-deficient (N < M), gradients that nearly repeat or
    cancel, norms spread over many decades (docs/solver.md)."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: float(torch.empty(()).uniform_(lo, hi, generator=gen))  # noqa: E731
    n = int(torch.randint(1, 2 * m + 2, (), generator=gen))
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if kind == "spread norms":
        g = g * torch.exp(3 * torch.randn(m, 1, generator=gen, dtype=torch.float64))
    elif kind == "near-duplicate":
        g[int(torch.randint(1, m, (), generator=gen))] = g[0] * (1 + 10.0 ** u(-15, -3))
    elif kind == "near-opposite":
        g[1] = -g[0] * 10.0 ** u(-6, 6) + 10.0 ** u(-14, -4) * torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "rank one plus noise":
        g = torch.randn(m, 1, generator=gen, dtype=torch.float64) * torch.randn(1, n, generator=gen, dtype=torch.float64)
        g = g + 10.0 ** u(-12, -2) * torch.randn(m, n, generator=gen, dtype=torch.float64)
    elif kind == "norms over 16 decades":
        g = g * 10.0 ** (16 * torch.rand(m, 1, generator=gen, dtype=torch.float64) - 8)
    else:
        h = m // 2
        g[:h] = g[h:2 * h] + 1e-9 * torch.randn(h, n, generator=gen, dtype=torch.float64)
    return g @ g.T


def dual_cone_errors(k: Tensor, u: Tensor, v: Tensor, host: Tensor, norm_eps: float = 1e-4,
                     reg_eps: float = 1e-4) -> Dict[str, float]:
    """How far weights ``v`` of the projection of ``J^T u`` onto the dual cone (``K = J J^T``)
    are from the host's exact ``host``, on the program's own Gramian ``Kr``
    (``reference.gramian.dual_cone_gram``): ``distance``, ``||v - host||_Kr / ||host||_Kr``
    (which ``f(v) - f(host)`` bounds, squared, for feasible ``v``); ``infeasibility``,
    ``max(u - v) / max u`` (``v >= u`` is the constraint); ``conflict``, ``max(-Kr v)``
    relative to ``max|Kr| sum|v|`` (``Kr v >= 0``: the update conflicts with no objective)."""
    from ..reference.gramian import dual_cone_gram

    kr = torch.from_numpy(dual_cone_gram(k, norm_eps, reg_eps))
    d = v - host
    norm = float(host @ kr @ host) ** 0.5
    return {"distance": max(float(d @ kr @ d), 0.0) ** 0.5 / max(norm, 1e-300),
            "infeasibility": float((u - v).max()) / max(float(u.max()), 1e-300),
            "conflict": float(-(kr @ v).min()) / max(float(kr.abs().max()) * float(v.abs().sum()), 1e-300)}


def duality_gap(k: Tensor, a: Tensor) -> float:
    """docs/spec.md §4's duality gap over the objectives that reach the group."""
    ka = k @ a
    return float(a @ ka - ka[k.diagonal() > 0].min())


def rel_err(x: Tensor, ref: Tensor, floor: float = 0.0) -> float:
    """``max|x - ref| / max(max|ref|, floor)`` in float64 (0 when both are all zeros).

    ``floor=1`` makes it an absolute error for quantities in [0, 1] (beliefs,
    uncertainties, shares): a fused uncertainty of 1e-39 is subnormal in float32, and its
    relative error says nothing about the opinion."""
    x64, r64 = x.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if x64.shape != r64.shape:
        raise ValueError(f"shapes differ: {tuple(x64.shape)} vs {tuple(r64.shape)}")
    if not torch.equal(torch.isfinite(x64), torch.isfinite(r64)):
        return float("inf")
    fin = torch.isfinite(r64)
    diff = (x64 - r64)[fin].abs().max() if fin.any() else torch.tensor(0.0)
    scale = r64[fin].abs().max() if fin.any() else torch.tensor(0.0)
    scale = torch.clamp_min(scale, floor)
    if float(scale) == 0.0:
        return float(diff)
    return float(diff / scale)


@dataclass
class Case:
    """Inputs for one comparison; ``g`` in the tested dtype, state in float32/64."""

    g: Tensor          # M x N gradients
    mean: Tensor       # M x N EMA state: the bias-corrected mean ...
    var: Tensor        # ... and the variance, >= 0
    samples: Tensor    # S x M x N
    group_offsets: Tensor
    step: int
    alpha: Tensor      # G x M float64 combination weights, one row per group


def random_case(m: int, n: int, dtype: torch.dtype, generator: torch.Generator, *, samples: int = 3) -> Case:
    """Random gradients and state with the spec's edge cases mixed in."""
    gen = generator
    scale = torch.exp(torch.randn(m, 1, generator=gen, dtype=torch.float64))  # objectives of unequal size
    g = torch.randn(m, n, generator=gen, dtype=torch.float64) * scale
    mean = torch.randn(m, n, generator=gen, dtype=torch.float64) * scale
    var = torch.rand(m, n, generator=gen, dtype=torch.float64) * scale**2
    # An objective that does not reach some coordinates: g = 0 and zero state there.
    unreached = torch.rand(m, n, generator=gen) < 0.1
    g[unreached], mean[unreached], var[unreached] = 0.0, 0.0, 0.0
    if m >= 2 and n >= 2:  # confident, exactly opposite objectives on one coordinate
        g[0, 1], g[1, 1] = 3.0, -3.0
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.randn(samples, m, n, generator=gen, dtype=torch.float64) * scale + g
    s[:, unreached] = 0.0
    cuts = sorted(set(int(x) for x in torch.randint(0, n + 1, (2,), generator=gen)))
    offsets = torch.tensor(sorted(set([0, *cuts, n])), dtype=torch.int64)
    return Case(
        g=g.to(dtype),
        mean=mean.to(state_dtype),
        var=var.to(state_dtype),
        samples=s.to(dtype),
        group_offsets=offsets,
        step=int(torch.randint(1, 50, (1,), generator=gen)),
        alpha=torch.rand(offsets.numel() - 1, m, generator=gen, dtype=torch.float64),
    )


def _f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def compare_all(backend: str, case: Case) -> Dict[str, float]:
    """Max relative error of every docs/spec.md §6 function ``backend`` has a kernel for, on ``case``."""
    c, b, errs = case, backend, {}
    ref = reference
    mu = c.g if c.g.dtype == torch.float64 else c.g.float()  # the pure functions compute in float32/64
    rmean, rvar = ref.ema_moments(_f64(c.g), _f64(c.mean), _f64(c.var), c.step, 0.9)
    var_in = rvar.to(mu.dtype)
    # the element-wise functions, on the backends that have kernels for them (the GPU
    # backends leave them to the reference: comparing that with itself would prove nothing)
    if ops.implements(ops.backend_module(b, c.g.device), "bogc_from_moments"):
        mean, var = ops.ema_moments(c.g, c.mean, c.var, c.step, 0.9, backend=b)
        errs["ema_moments"] = max(rel_err(mean, rmean, ema_floor(c.g, c.mean)), rel_err(var, rvar))
        lam, bp, bn, u = ops.opinions(mu, var_in, 1.0, 1e-8, backend=b)
        rl, rbp, rbn, ru = ref.opinions(_f64(mu), _f64(var_in), 1.0, 1e-8)
        errs["opinions"] = max(rel_err(lam, rl), rel_err(bp, rbp, 1.0), rel_err(bn, rbn, 1.0), rel_err(u, ru, 1.0))
        f = ops.ds_combine(rbp.to(mu.dtype), rbn.to(mu.dtype), ru.to(mu.dtype), backend=b)
        rf = ref.ds_combine(rbp.to(mu.dtype).double(), rbn.to(mu.dtype).double(), ru.to(mu.dtype).double())
        errs["ds_combine"] = max(rel_err(x, y, 1.0) for x, y in zip(f, rf))
        worst = 0.0
        # |b+ - b-| * mu_F cancels where the fused beliefs nearly tie: judged, as the fuzz tests
        # do, by the backward-stable bound eps * M * max|mu| (docs/spec.md, decision 15), not by
        # the output's own size (seed 875069989: b+ 0.2748, b- 0.2725 gave 1.5e-5 in float32).
        floor = stable_floor(mu)
        for conf in ("belief", "certainty", "none"):
            for w in ("belief", "precision"):
                out, d = ops.bogc_from_moments(mu, var_in, confidence=conf, weights=w, backend=b)
                rout, rd = ref.bogc_from_moments(_f64(mu), _f64(var_in), confidence=conf, weights=w)
                worst = max(worst, rel_err(out, rout, floor), rel_err(d["uncertainty"], rd["uncertainty"], 1.0),
                            rel_err(d["weights"], rd["weights"], 1.0))
        errs["bogc_from_moments"] = worst
    out, _, _, st = ops.bogc_step(c.g, c.mean, c.var, c.step, group_offsets=c.group_offsets, backend=b)
    rout, _, _, rst = ref.bogc_step(_f64(c.g), _f64(c.mean), _f64(c.var), c.step, group_offsets=c.group_offsets)
    # the steps by the same backward-stable bound (seed 790576208: M = 11, N = 1, a sample
    # step's near-tie gave 1.8e-4 relative to its output, with either fold)
    errs["bogc_step"] = max(rel_err(out, rout, stable_floor(c.g)), rel_err(st["gram"], rst["gram"]))
    out, _ = ops.bogc_sample_step(c.samples, group_offsets=c.group_offsets, backend=b)
    rout, _ = ref.bogc_sample_step(_f64(c.samples), group_offsets=c.group_offsets)
    errs["bogc_sample_step"] = rel_err(out, rout, stable_floor(c.samples))
    k = ops.gram(c.g, group_offsets=c.group_offsets, backend=b)
    rk = ref.gram(_f64(c.g), group_offsets=c.group_offsets)
    errs["gram"] = rel_err(k, rk)
    errs["combine"] = rel_err(
        ops.combine(c.g, c.alpha, group_offsets=c.group_offsets, backend=b),
        ref.combine(_f64(c.g), c.alpha, group_offsets=c.group_offsets),
        combine_floor(c.g, c.alpha, c.group_offsets),
    )
    return errs


def run(backend_names: Sequence[str], ms: Sequence[int], ns: Sequence[int], dtypes: Sequence[torch.dtype], seed: int) -> Tuple[List[str], bool]:
    gen = torch.Generator().manual_seed(seed)
    worst: Dict[Tuple[str, str, torch.dtype], float] = {}
    for b in backend_names:
        for dt in dtypes:
            for m in ms:
                for n in ns:
                    for fn, e in compare_all(b, random_case(m, n, dt, gen)).items():
                        key = (b, fn, dt)
                        worst[key] = max(worst.get(key, 0.0), e)
    lines, ok = [], True
    lines.append(f"{'backend':10s} {'function':18s} {'dtype':9s} {'max rel err':>12s} {'tolerance':>10s}")
    for (b, fn, dt), e in worst.items():
        tol = TOLERANCE[dt]
        bad = not e <= tol
        ok &= not bad
        lines.append(f"{b:10s} {fn:18s} {str(dt).replace('torch.', ''):9s} {e:12.3e} {tol:10.0e}{'  FAIL' if bad else ''}")
    return lines, ok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgrad verify", description=describe(__doc__))
    p.add_argument("--seed", type=int, default=None, help="seed (default: from the clock, printed)")
    kernels = [n for n in backends() if n != "reference"]
    p.add_argument("--backends", nargs="*", default=None, choices=kernels, metavar="BACKEND",
                   help=f"backends to check, of {', '.join(kernels)} (default: every one available on CPU tensors)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 2**31
    avail = [n for n, i in backends().items() if i.available and n != "reference" and "cpu" in i.devices]
    for name in args.backends or ():
        if name not in avail:
            p.error(f"backend {name!r} does not run on CPU tensors here: {backends()[name].reason or 'it runs on CUDA tensors'}")
    names = args.backends if args.backends is not None else avail
    if not names:
        print("no kernel backend available on CPU tensors; only the reference runs here")
        return 1
    print(f"mmgrad verify: backends {names}, seed {seed}")
    lines, ok = run(names, ms=(1, 2, 3, 8, 11), ns=(1, 7, 1023, 4097), dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), seed=seed)
    print("\n".join(lines))
    print("OK: every backend matches the reference" if ok else "FAILED: see the rows marked FAIL")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
