"""CPU kernels against the float64 reference (issue: C++/OpenMP fused kernels).

Tolerances (normwise max relative error, mmgrad.tools.verify.TOLERANCE): float32 <= 1e-5,
bf16/fp16 <= 1e-2 (the output is rounded to the gradient dtype), float64 <= 1e-10.
Outputs are poisoned with NaN before the kernel writes them.
"""

from __future__ import annotations

import pytest
import torch

import mmgrad
from mmgrad import ops
from mmgrad import reference as R
from mmgrad.tools.verify import TOLERANCE, combine_floor, compare_all, ema_floor, norm_sq_floor, random_case, rel_err

from conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels

MS = (1, 2, 3, 4, 8, 11)
NS = (1, 7, 1023, 4097)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def f64(t):
    return t.to(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", MS)
def test_every_function_matches_the_reference(gen, m, dtype):
    for n in NS:
        errs = compare_all("cpu", random_case(m, n, dtype, gen))
        bad = {k: e for k, e in errs.items() if not e <= TOLERANCE[dtype]}
        assert not bad, f"M={m} N={n} {dtype}: {bad}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("m", (2, 11))
def test_large_n_not_a_multiple_of_the_chunk(gen, m, dtype):
    n = 2**20 + 3
    c = random_case(m, n, dtype, gen, samples=2)
    out = torch.full((n,), float("nan"), dtype=dtype)
    m_out, v_out = torch.full_like(c.mean, float("nan")), torch.full_like(c.var, float("nan"))
    res, m1, v1, st = ops.bogc_step(c.g, c.mean, c.var, c.step, group_offsets=c.group_offsets, out=out, mean_out=m_out, var_out=v_out, backend="cpu")
    ref, rm1, rv1, rst = R.bogc_step(f64(c.g), f64(c.mean), f64(c.var), c.step, group_offsets=c.group_offsets)
    assert res.data_ptr() == out.data_ptr() and m1.data_ptr() == m_out.data_ptr()
    tol = TOLERANCE[dtype]
    assert rel_err(res, ref) <= tol and rel_err(m1, rm1, ema_floor(c.g, c.mean)) <= 1e-6 and rel_err(v1, rv1) <= 1e-6
    assert rel_err(st["gram"], rst["gram"]) <= 1e-12
    assert rel_err(ops.gram(c.g, backend="cpu"), R.gram(f64(c.g))) <= 1e-12


@pytest.mark.parametrize("confidence", ("belief", "certainty", "none"))
@pytest.mark.parametrize("weights", ("belief", "precision"))
@pytest.mark.parametrize("rescale", (True, False))
def test_bogc_step_options_with_poisoned_outputs(gen, confidence, weights, rescale):
    for m in (1, 3, 8, 11):
        c = random_case(m, 1023, torch.float32, gen)
        kw = dict(beta=0.8, gamma=0.5, eps=1e-6, confidence=confidence, weights=weights, rescale=rescale, group_offsets=c.group_offsets)
        out = torch.full((1023,), float("nan"))
        m_out, v_out = torch.full_like(c.mean, float("nan")), torch.full_like(c.var, float("nan"))
        res, m1, v1, st = ops.bogc_step(c.g, c.mean, c.var, c.step, out=out, mean_out=m_out, var_out=v_out, backend="cpu", **kw)
        ref, rm1, rv1, rst = R.bogc_step(f64(c.g), f64(c.mean), f64(c.var), c.step, **kw)
        assert rel_err(res, ref) <= 1e-5, f"M={m}"
        assert rel_err(m1, rm1, ema_floor(c.g, c.mean)) <= 1e-6 and rel_err(v1, rv1) <= 1e-6
        assert rel_err(st["sum_sq"], rst["sum_sq"]) <= 1e-5
        # where the fused beliefs nearly tie, |b+ - b-| cancels: the backward-stable bound
        assert rel_err(st["out_sq"], rst["out_sq"], norm_sq_floor(rst["out_sq"], c.g)) <= 1e-5
        for key in ("uncertainty", "conflict", "weights"):  # means of values in [0, 1]: absolute error
            assert (f64(st[key]) - f64(rst[key])).abs().max() <= 1e-6, key
        assert int(st["nonfinite"]) == 0


def test_sample_step_with_poisoned_output(gen):
    c = random_case(4, 4097, torch.float32, gen, samples=5)
    out = torch.full((4097,), float("nan"))
    res, st = ops.bogc_sample_step(c.samples, group_offsets=c.group_offsets, out=out, confidence="certainty", backend="cpu")
    ref, rst = R.bogc_sample_step(f64(c.samples), group_offsets=c.group_offsets, confidence="certainty")
    # the Gram of the float32 means: float32 rounding of mu, not of the products
    assert rel_err(res, ref) <= 1e-5 and rel_err(st["gram"], rst["gram"]) <= 1e-6


def test_state_may_be_updated_in_place(gen):
    c = random_case(3, 4097, torch.float32, gen)
    ref, rm1, rv1, _ = R.bogc_step(f64(c.g), f64(c.mean), f64(c.var), c.step)
    m, v = c.mean.clone(), c.var.clone()
    res, m1, v1, _ = ops.bogc_step(c.g, m, v, c.step, mean_out=m, var_out=v, backend="cpu")
    assert m1.data_ptr() == m.data_ptr() and rel_err(m, rm1, ema_floor(c.g, c.mean)) <= 1e-6 and rel_err(res, ref) <= 1e-5


def test_combine_and_gram_share_one_read(gen):
    c = random_case(5, 4097, torch.float32, gen)
    groups = c.group_offsets.numel() - 1
    alpha = torch.rand(groups, 5, dtype=torch.float64, generator=gen)
    out = torch.full((4097,), float("nan"))
    res, st = ops.combine_and_gram(c.g, alpha, group_offsets=c.group_offsets, out=out, backend="cpu")
    floor = combine_floor(c.g, alpha, c.group_offsets)  # backward-stable: N = 1 can cancel
    assert rel_err(res, R.combine(f64(c.g), alpha, group_offsets=c.group_offsets), floor) <= 1e-6
    assert rel_err(st["gram"], R.gram(f64(c.g), group_offsets=c.group_offsets)) <= 1e-12


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_gram_at_every_m_up_to_17(gen, dtype):
    """The Gram's tiles (2 x 4, then the row pairs left with the last columns two at a time
    as 4 x 2, one 2 x 2 for an odd one out) cover the upper triangle once at every M, in
    chunks with a tail (N = 1037: three chunks, the last 13 long)."""
    for m in range(1, 18):
        g = torch.randn(m, 1037, generator=gen).to(dtype)
        err = rel_err(ops.gram(g, backend="cpu"), R.gram(f64(g)))
        assert err <= 1e-12, f"M={m}: {err:.2e}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("m", (5, 8))
def test_rows_sharing_cache_sets_combine_as_any_rows(gen, m, dtype):
    """At N a multiple of 4 KiB of rows every row falls in the same L1 sets, and the
    combination reads M > 4 rows in two passes: the same sums, bit for bit, as one pass over
    rows that do not align (the first N columns of N + 1), and the reference's."""
    n = 4096
    wide = torch.randn(m, n + 1, generator=gen).to(dtype)
    g = wide[:, :n].contiguous()
    alpha = torch.rand(m, dtype=torch.float64, generator=gen)
    out, out_wide = torch.full((n,), float("nan"), dtype=dtype), torch.full((n + 1,), float("nan"), dtype=dtype)
    ops.combine(g, alpha, out=out, backend="cpu")
    ops.combine(wide, alpha, out=out_wide, backend="cpu")
    assert torch.equal(out, out_wide[:n])
    assert rel_err(out, R.combine(f64(g), alpha)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(3, 1023), (7, 1023), (7, 2048)])  # M = 7, N = 2048: rows 0-2, then 3-6
def test_nonfinite_entries_are_counted(gen, dtype, m, n):
    """float32/float64 rows are counted as the combination reads them in place, half rows as
    they are widened; the Gram alone counts nothing, and a poisoned row poisons its diagonal."""
    c = random_case(m, n, dtype, gen)
    g = c.g.clone()
    g[1, 5], g[m - 1, 700], g[0, 1022] = float("nan"), float("inf"), -float("inf")
    *_, st = ops.bogc_step(g, c.mean, c.var, 1, backend="cpu")
    assert int(st["nonfinite"]) == 3
    _, st = ops.combine_and_gram(g, torch.ones(m, dtype=torch.float64), backend="cpu")
    assert int(st["nonfinite"]) == 3
    _, st = ops.combine_and_gram(g, torch.ones(m, dtype=torch.float64), backend="cpu", with_gram=False)
    assert int(st["nonfinite"]) == 3
    poisoned = torch.zeros(m, dtype=torch.bool)
    poisoned[[0, 1, m - 1]] = True
    assert torch.equal(~torch.isfinite(ops.gram(g, backend="cpu").diagonal()), poisoned)


def test_confident_opposite_objectives_float32_kernel():
    g = torch.tensor([[1.0, 5.0, 1e25], [-1.0, -5.0, -1e25]])
    z = torch.zeros_like(g)
    out, d = ops.bogc_from_moments(g, z, backend="cpu")
    assert torch.isfinite(out).all() and out.abs().max() == 0
    assert torch.isfinite(d["uncertainty"]).all()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.gram(torch.randn(3, 8).T, backend="cpu"), ValueError, "contiguous"),
        (lambda: ops.gram(torch.randn(3, 8, dtype=torch.float64).to(torch.int32), backend="cpu"), TypeError, "floating"),
        (lambda: ops.gram(torch.randn(8), backend="cpu"), ValueError, "2 dimensions"),
        (lambda: ops.ema_moments(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4), 1, 0.9, backend="cpu"), TypeError, "mean must be torch.float32"),
        (lambda: ops.ema_moments(torch.randn(2, 4), torch.zeros(2, 5), torch.zeros(2, 5), 1, 0.9, backend="cpu"), ValueError, "shape"),
        (lambda: ops.ema_moments(torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), 0, 0.9, backend="cpu"), ValueError, "step"),
        (lambda: ops.ema_moments(torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), 1, 1.0, backend="cpu"), ValueError, "beta"),
        (lambda: ops.bogc_from_moments(torch.randn(2, 4), torch.rand(2, 4), eps=0.0, backend="cpu"), ValueError, "eps"),
        (lambda: ops.bogc_from_moments(torch.randn(2, 4), torch.rand(2, 4), confidence="max", backend="cpu"), ValueError, "confidence"),
        (lambda: ops.bogc_from_moments(torch.randn(2, 4), torch.rand(2, 4), weights="x", backend="cpu"), ValueError, "weights"),
        (lambda: ops.bogc_from_moments(torch.randn(2, 4), torch.rand(2, 4), gamma=-1.0, backend="cpu"), ValueError, "gamma"),
        (lambda: ops.bogc_step(torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), 1, out=torch.zeros(3), backend="cpu"), ValueError, "out"),
        (lambda: ops.bogc_sample_step(torch.randn(1, 2, 4), backend="cpu"), ValueError, "S >= 2"),
        (lambda: ops.combine(torch.randn(2, 4), torch.ones(3), backend="cpu"), ValueError, "alpha"),
        (lambda: ops.combine(torch.randn(2, 4), torch.ones(2), out=torch.zeros(4, dtype=torch.float64), backend="cpu"), ValueError, "out must be a torch.float32 vector of length 4"),
        (lambda: ops.combine(torch.randn(2, 4), torch.ones(2), out=torch.zeros(4, 2)[:, 0], backend="cpu"), ValueError, "out must be contiguous"),
        (lambda: ops.combine(torch.randn(2, 4), torch.ones(2), out=[0.0] * 4, backend="cpu"), TypeError, "out must be a torch.Tensor"),
        (lambda: ops.bogc_step(torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), 1, out=torch.zeros(4, dtype=torch.float16), backend="cpu"), ValueError, "out must be a torch.float32 vector"),
        (lambda: ops.gram(torch.randn(2, 4), group_offsets=torch.tensor([0, 5]), backend="cpu"), ValueError, "group_offsets"),
        (lambda: ops.gram(torch.randn(70, 4), backend="cpu"), ValueError, "at most 64"),
        (lambda: ops.gram(torch.randn(2, 4), backend="gpu"), ValueError, "backend must be one of"),
        (lambda: ops.gram(torch.randn(2, 4), backend="cuda"), ValueError, "unavailable"),
    ],
)
def test_bad_input_gives_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_an_output_that_shares_memory_with_the_gradients_is_refused(backend):
    """The kernels read float32 rows in place while they write ``out``: an ``out`` inside g
    would change the rows (and the Gram read after them) mid-pass, so it is refused."""
    if not mmgrad.backends()[backend].available:
        pytest.skip(f"backend {backend} unavailable")
    g = torch.randn(3, 8)
    for call in (lambda: ops.combine(g, torch.ones(3), out=g[1], backend=backend),
                 lambda: ops.combine_and_gram(g, torch.ones(3), out=g.view(-1)[4:12], backend=backend),
                 lambda: ops.bogc_step(g, torch.zeros(3, 8), torch.zeros(3, 8), 1, out=g[0], backend=backend)):
        with pytest.raises(ValueError, match="out shares memory with the gradients"):
            call()
    out = torch.empty(8)
    ops.combine(g, torch.ones(3), out=out, backend=backend)  # a separate tensor is taken, and written
    assert torch.allclose(out, g.sum(0), atol=1e-6)


@pytest.mark.parametrize("weights", ["belief", "precision"])
def test_subnormal_weight_sums_kernel(weights):
    mu = torch.tensor([[1e-20, -3e-20, 2e-20], [2e-20, 1e-20, 0.0]], dtype=torch.float32)
    out, d = ops.bogc_from_moments(mu, torch.ones_like(mu), weights=weights, confidence="none", backend="cpu")
    ref, _ = R.bogc_from_moments(mu.double(), torch.ones_like(mu).double(), weights=weights, confidence="none")
    assert torch.isfinite(out).all() and torch.isfinite(d["weights"]).all()
    assert rel_err(out, ref) <= 1e-5


def test_reductions_are_bit_identical_at_any_thread_count(gen):
    """Per-block partial statistics are added in block order: the same inputs give the same
    bits on 1, 2 or 3 threads (here N spans 40 blocks of 16 chunks, in two groups)."""
    n = 16 * 512 * 40 - 7
    c = random_case(5, n, torch.float32, gen)
    off = torch.tensor([0, 100_003, n])
    alpha = torch.rand(2, 5, dtype=torch.float64, generator=gen)
    runs, threads = [], torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out, mo, vo, st = ops.bogc_step(c.g, c.mean, c.var, 3, group_offsets=off, backend="cpu")
            comb, cst = ops.combine_and_gram(c.g, alpha, group_offsets=off, backend="cpu")
            runs.append([out, mo, vo, st["gram"], st["sum_sq"], st["out_sq"], st["share_sum"], comb, cst["gram"],
                         ops.gram(c.g, group_offsets=off, backend="cpu")])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@requires_cpu_kernels
@pytest.mark.parametrize("m,groups", [(1, 1), (3, 2), (8, 5), (64, 1)])
def test_the_statistics_layout_is_the_headers(m, groups):
    """The Python reader of the step statistics (kernels/stats.py) and the header's
    StatsLayout, which the C++ and CUDA kernels write, are one layout."""
    from mmgrad.backends import cpu_extension
    from mmgrad.kernels import stats

    header = cpu_extension().stats_layout(m, groups)
    assert {name: header[name] for name in stats.SCALARS} == stats.OFFSET
    assert (header["share_sum"], header["gram"], header["size"]) == (stats.SHARES, stats.SHARES + m, stats.width(m, groups))


@requires_cpu_kernels
def test_the_shared_constants_are_the_headers():
    """mmgrad/_constants.py (read by the reference and the Triton kernels) holds the
    values and option codes that csrc/mmgrad_math.h gives the C++ and CUDA kernels."""
    from mmgrad import _constants as C
    from mmgrad.backends import cpu_extension

    ext = cpu_extension()
    assert (ext.EVIDENCE_MAX, ext.MOO_GAP_TOL, ext.MOO_MAX_OBJECTIVES) == (C.EVIDENCE_MAX, C.MOO_GAP_TOL, C.MOO_MAX_OBJECTIVES)
    assert dict(ext.CONFIDENCE_CODES) == C.CONFIDENCE_CODES
    assert dict(ext.WEIGHT_CODES) == C.WEIGHT_CODES
    assert dict(ext.NORMALIZE_CODES) == C.NORMALIZE_CODES
    assert tuple(ext.MOO_METHOD_CODES) == tuple(C.MOO_METHOD_CODES[name] for name in C.MOO_METHODS)


@requires_cpu_kernels
def test_the_cpu_backend_solves_with_the_headers_solver_not_the_reference(gen):
    """The cpu backend's MOO weights come from csrc/mmgrad_math.h's solver (the GPU
    backends' algorithm), so comparing them with the reference compares two solvers."""
    from mmgrad.backends import cpu_extension

    g = torch.randn(4, 300, generator=gen, dtype=torch.float64)
    grams = R.gram(g, group_offsets=torch.tensor([0, 120, 300]))
    for method in ("mgda", "mmpareto"):
        got = ops.moo_weights(grams, method, backend="cpu")
        header = cpu_extension().moo_weights_device(grams, {"mgda": 0, "mmpareto": 1}[method], 0,
                                                    torch.ones(4, dtype=torch.float64), 1.5)
        assert torch.equal(got, header), method
        ref = R.moo_weights(grams, method)
        for k, a, b in zip(grams, got, ref):  # the same min-norm point (weights may differ on singular K)
            d = a - b
            assert float(d @ k @ d) <= 1e-6 * float(k.diagonal().max()), (method, a, b)
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        ops.moo_weights(torch.eye(17, dtype=torch.float64)[None], "mgda", backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_backend_without_a_kernel_for_a_function_refuses_it_by_name(backend):
    """Naming a backend never runs the reference under its name; "auto" does, and says so
    in the docs. The cpu backend has no kernel for the per-group host solves, the GPU
    backends none for the element-wise functions."""
    if not mmgrad.backends()[backend].available or "cpu" not in mmgrad.backends()[backend].devices:
        pytest.skip(f"{backend} does not run on CPU tensors here")
    k = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=f"backend '{backend}' has no kernel for mgda_weights"):
        ops.mgda_weights(k, backend=backend)
    assert torch.equal(ops.mgda_weights(k), R.mgda_weights(k))  # auto: the reference
    module = ops.backend_module(backend, torch.device("cpu"))
    assert not ops.implements(module, "mgda_weights") and ops.implements(module, "moo_weights")
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="backend 'triton' has no kernel for opinions"):
            ops.opinions(torch.randn(2, 3), torch.rand(2, 3), 1.0, 1e-8, backend="triton")
