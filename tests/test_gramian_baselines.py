"""The Gramian baselines (``upgrad``, ``dualproj``, ``pcgrad``, ``cagrad``, ``imtl_g``,
``aligned_mtl``, ``nash_mtl``)
against TorchJD 0.18 as an external oracle, against fixed values, and under the
properties their papers prove; through the calibrator, ``tests/test_layout.py`` holds each
against the dense computation on every backend.

The comparison is of the updates ``J^T w`` (normwise, relative), the quantity a user
trains with: on rank-deficient Gramians the weights themselves are not unique.
Tolerances: 1e-8 where both solve the same problem exactly (UPGrad and DualProj: TorchJD
asks quadprog, mmgrad an active-set method, both to round-off on a unit-trace Gramian
regularised by 1e-4 I; measured worst 2e-10 in the weights), and 1e-12 for the closed
forms, which run the same algorithm on the same input (IMTL-G's pseudo-inverse,
Aligned-MTL's eigen-decomposition of the Gramian's upper triangle, PCGrad's projections
with the same orders). CAGrad: 1e-3, the accuracy of TorchJD's conic solver (Clarabel;
measured worst 1.3e-4), with mmgrad's exact optimum also checked to be at least as good
as TorchJD's (its objective, its constraint). Nash-MTL: TorchJD's sequential convex
programs stop early or fail on some draws (a residual ``alpha * (G alpha) - 1`` up to 30
where mmgrad's is 1e-12), so it is compared where its residual is below 1e-6, within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmgrad
from mmgrad.methods import METHODS
from mmgrad.reference.gramian import pcgrad_orders
from mmgrad.reference import gramian as RG
from mmgrad.tools.verify import rel_err

torchjd = pytest.importorskip("torchjd.aggregation", reason="torchjd==0.18.0 is a test dependency (make test installs it)")

BASELINES = ("upgrad", "dualproj", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "nash_mtl")


def jacobian(gen: torch.Generator, kind: str) -> torch.Tensor:
    """M x R float64 Jacobians: well-conditioned, ill-conditioned (row norms over 6 decades)
    or rank-deficient (R < M)."""
    m = int(torch.randint(2, 9, (), generator=gen))
    r = {"plain": 12, "ill": 12, "deficient": max(1, m - 2)}[kind]
    j = torch.randn(m, r, generator=gen, dtype=torch.float64)
    if kind == "ill":
        j = j * torch.logspace(-3, 3, m, dtype=torch.float64)[:, None]
    return j


def gramian(j: torch.Tensor) -> torch.Tensor:
    """``J J^T``, exactly symmetric: a matmul may round ``g_ij`` and ``g_ji`` differently,
    and mmgrad symmetrises its input; at a condition number of 1e12 (the ill-conditioned
    draws) that one ulp moves IMTL-G's pseudo-inverse by 1e-8, so both get the same matrix."""
    g = j @ j.T
    return (g + g.T) / 2


def theirs(name: str, gram: torch.Tensor, **options) -> torch.Tensor:
    cls = {"upgrad": torchjd.UPGradWeighting, "dualproj": torchjd.DualProjWeighting, "imtl_g": torchjd.IMTLGWeighting,
           "aligned_mtl": torchjd.AlignedMTLWeighting, "cagrad": torchjd.CAGradWeighting}[name]
    if name == "cagrad":
        options = {"c": 0.5, **options}  # TorchJD has no default c
    return cls(**options)(gram)


def cagrad_ours(gram: torch.Tensor, **options) -> torch.Tensor:
    return RG.cagrad_weights(gram, **{"rescale": 0, **options})  # TorchJD's CAGrad does not rescale


OURS = {"upgrad": RG.upgrad_weights, "dualproj": RG.dualproj_weights, "imtl_g": RG.imtl_g_weights,
        "aligned_mtl": RG.aligned_mtl_weights, "cagrad": cagrad_ours}
TOLERANCE = {"upgrad": 1e-8, "dualproj": 1e-8, "imtl_g": 1e-12, "aligned_mtl": 1e-12, "cagrad": 1e-3}


@pytest.mark.parametrize("kind", ["plain", "ill", "deficient"])
@pytest.mark.parametrize("name", sorted(OURS))
def test_the_weights_are_torchjds(gen, name, kind):
    for _ in range(20):
        j = jacobian(gen, kind)
        g = gramian(j)
        ours, ref = j.T @ OURS[name](g), j.T @ theirs(name, g)
        assert rel_err(ours, ref) <= TOLERANCE[name], f"M = {j.shape[0]}: {rel_err(ours, ref):.2e}"


def test_the_options_are_torchjds(gen):
    for _ in range(10):
        j = jacobian(gen, "plain")
        g, m = j @ j.T, j.shape[0]
        pref = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
        for name in ("upgrad", "dualproj", "aligned_mtl"):
            ref = theirs(name, g, pref_vector=pref)
            assert rel_err(j.T @ OURS[name](g, pref_vector=pref.tolist()), j.T @ ref) <= TOLERANCE[name], name
        for mode in RG.ALIGNED_MTL_SCALES:
            ref = theirs("aligned_mtl", g, scale_mode=mode)
            assert rel_err(j.T @ RG.aligned_mtl_weights(g, scale_mode=mode), j.T @ ref) <= 1e-12, mode


def test_pcgrad_is_torchjds_with_the_same_orders(gen):
    for trial in range(20):
        j = jacobian(gen, "plain")
        g, m = j @ j.T, j.shape[0]
        torch.manual_seed(trial)  # TorchJD draws one order per objective from the global generator
        orders = [torch.randperm(m).tolist() for _ in range(m)]
        torch.manual_seed(trial)
        ref = torchjd.PCGradWeighting()(g)
        assert rel_err(j.T @ RG.pcgrad_weights(g, orders), j.T @ ref) <= 1e-12


def test_upgrad_gives_torchjds_documented_value():
    j = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    update = j.T @ RG.upgrad_weights(j @ j.T)
    assert torch.allclose(update, torch.tensor([0.2929, 1.9004, 1.9004], dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_the_dual_cone_updates_conflict_with_no_objective(gen, name):
    """Non-conflicting: ``J (J^T w) >= 0``, exactly so without the regularisation (which
    projects in a metric 1e-4 away, as TorchJD does by default), on full-rank Jacobians."""
    for kind in ("plain", "ill"):
        for _ in range(10):
            j = jacobian(gen, kind)
            g = j @ j.T
            along = g @ OURS[name](g, reg_eps=0.0)
            assert bool((along >= -1e-10 * float(g.diagonal().max())).all()), (kind, along)


@pytest.mark.parametrize("name", sorted(OURS) + ["pcgrad", "nash_mtl"])
def test_permuted_objectives_permute_the_weights_and_scale_changes_nothing(gen, name):
    """Scaling the gradients by ``t`` (the Gramian by ``t^2``) leaves the weights alone, but
    Nash-MTL's, which scale by ``1 / t`` (``alpha * (G alpha) = 1``)."""
    for _ in range(10):
        j = jacobian(gen, "plain")
        g, m = j @ j.T, j.shape[0]
        solve = {"pcgrad": lambda k: RG.pcgrad_weights(k, [list(range(m))] * m),
                 "nash_mtl": lambda k: RG.nash_mtl_weights(k, max_norm=0)}.get(name, OURS.get(name))
        w = solve(g)
        assert rel_err(solve(6.25 * g), w / 2.5 if name == "nash_mtl" else w) <= 1e-9, "scale"
        if name == "pcgrad":  # its result depends on the order, which a permutation changes
            continue
        perm = torch.randperm(m, generator=gen)
        assert rel_err(solve(g[perm][:, perm]), w[perm]) <= 1e-8, "permutation"


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_checks_its_options_and_refuses_sync_free_without_a_device_solver(name):
    lin = torch.nn.Linear(3, 2)
    cls = METHODS[name]
    assert cls.family == "gramian" and cls.defaults["lagged"] is False
    assert cls.sync_free == (name in ("upgrad", "dualproj"))  # their device solver: tests/test_device_dual_cone.py
    if mmgrad.backends()["triton"].available and not cls.sync_free:
        with pytest.raises(ValueError, match=f"sync_free=True: method '{name}' declares no solve"):
            mmgrad.FusedCalibrator(lin.parameters(), 2, method=name, backend="triton", sync_free=True,
                                   skip_nonfinite=True)
    if "pref_vector" in cls.defaults:
        with pytest.raises(ValueError, match="pref_vector must hold one value per objective"):
            mmgrad.FusedCalibrator(lin.parameters(), 2, method=name, pref_vector=[1.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="pref_vector must be None or a list of numbers >= 0"):
            mmgrad.FusedCalibrator(lin.parameters(), 2, method=name, pref_vector=[1.0, -1.0])
    if name == "pcgrad":
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            mmgrad.FusedCalibrator(lin.parameters(), 2, method=name, seed=-1)
    if name == "cagrad":
        for bad, match in (({"c": -0.1}, "c must be a finite number >= 0"), ({"rescale": 3}, "rescale must be one of"),
                           ({"norm_eps": float("nan")}, "norm_eps must be")):
            with pytest.raises(ValueError, match=match):
                mmgrad.FusedCalibrator(lin.parameters(), 2, method=name, **bad)
    if name == "nash_mtl":
        with pytest.raises(ValueError, match="max_norm must be a finite number >= 0"):
            mmgrad.FusedCalibrator(lin.parameters(), 2, method=name, max_norm=-1.0)


def test_pcgrads_orders_follow_the_seed_and_the_step():
    a = pcgrad_orders(0, 5, 1, 6)
    assert a == pcgrad_orders(0, 5, 1, 6) and all(sorted(o) == list(range(6)) for o in a)
    assert a != pcgrad_orders(1, 5, 1, 6) and a != pcgrad_orders(0, 6, 1, 6)


@pytest.mark.parametrize("backend", ["reference", *[b for b, i in mmgrad.backends().items()
                                                    if i.available and b != "reference" and "cpu" in i.devices]])
def test_pcgrad_through_the_calibrator_uses_the_seeds_orders(backend):
    """Four conflicting objectives whose projections depend on the order: each step's
    update is the one its seed's and step's orders give, and seeds and steps differ."""
    a = torch.tensor([[1.0, 0.0, 0.0], [-0.9, 1.0, 0.0], [-0.5, -0.8, 0.3], [0.2, -0.7, -1.0]])
    j = a.double()
    updates = {}
    for seed in (0, 1, 2):
        p = torch.nn.Parameter(torch.zeros(3))
        cal = mmgrad.FusedCalibrator([p], 4, method="pcgrad", seed=seed, backend=backend)
        for step in (1, 2, 3):
            p.grad = None
            cal.backward([(p * a[k]).sum() for k in range(4)])
            want = j.T @ RG.pcgrad_weights(j @ j.T, pcgrad_orders(seed, step, 0, 4))
            assert rel_err(p.grad.double(), want) <= 1e-6, (seed, step)
            updates[seed, step] = p.grad.clone()
    assert len({tuple(u.tolist()) for u in updates.values()}) >= 3  # the orders matter on these gradients


def test_cagrad_attains_its_objective_at_least_as_well_as_torchjd(gen):
    """CAGrad's update ``d = J^T w`` maximises ``min_i g_i . d`` subject to
    ``||d - g0|| <= c ||g0||``: mmgrad's update keeps to the ball (to round-off) and its
    worst improvement is no smaller than TorchJD's (whose solver stops at its tolerance).
    Where the exact optimum's ``||g_w||`` is below ``norm_eps`` both return no update by
    TorchJD's rule (counted, not compared: TorchJD's inexact ``w`` may not fall below it)."""
    compared = 0
    for kind in ("plain", "ill", "deficient"):
        for _ in range(15):
            j = jacobian(gen, kind)
            g, m = j @ j.T, j.shape[0]
            c = float(torch.rand((), generator=gen, dtype=torch.float64)) * 1.5 + 0.05
            w = cagrad_ours(g, c=c)
            if float(w.abs().max()) == 0.0:
                continue
            compared += 1
            g0 = j.mean(0)
            ours, ref = j.T @ w, j.T @ theirs("cagrad", g, c=c)
            scale = float(j.norm(dim=1).max())
            assert float((ours - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9) + 1e-12 * scale, (kind, m)
            assert float((j @ ours).min()) >= float((j @ ref).min()) - 1e-10 * scale ** 2, (kind, m)
    assert compared >= 20


def test_cagrads_simplex_solve_meets_its_optimality_conditions(gen):
    """``argmin_{w in simplex} b.w + s sqrt(w^T K w)``, ``b = K u``: where ``||R^T w||`` is
    not ~0, the Frank-Wolfe gap ``grad.w - min_i grad_i`` (an upper bound on the
    suboptimality) is at round-off; everywhere (the Pareto-stationary null face
    included), no vertex and none of 2,000 random points of the simplex does better."""
    for kind in ("plain", "ill", "deficient"):
        for _ in range(20):
            j = jacobian(gen, kind)
            k = (j @ j.T).numpy()
            k = k / k.trace()
            m = k.shape[0]
            b = k @ (torch.full((m,), 1.0 / m, dtype=torch.float64).numpy())
            s = 2 * float(torch.rand((), generator=gen)) * float(b.sum()) ** 0.5
            w = RG.cagrad_simplex_solve(k, b, s)
            assert abs(w.sum() - 1) <= 1e-12 and (w >= 0).all()

            def value(x):
                return x @ b + s * np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", x, k, x), 0.0))

            norm = max(float(w @ k @ w), 0.0) ** 0.5
            if norm > 1e-6:
                grad = b + s * (k @ w) / norm
                assert float(grad @ w - grad.min()) <= 1e-10 * max(1.0, float(np.abs(grad).max())), (kind, m, s)
            points = np.random.default_rng(int(torch.randint(2**31, (), generator=gen))).dirichlet(
                np.full(m, 0.3), size=2000)
            assert float(value(w)) <= float(min(value(points).min(), value(np.eye(m)).min())) + 1e-12, (kind, m, s)


def test_cagrad_with_c_zero_is_the_mean_rescale_divides_and_an_unreached_objective_has_no_say():
    j = torch.tensor([[1.0, 0.0, 2.0], [-0.5, 1.0, 0.0], [0.3, -2.0, 1.0]], dtype=torch.float64)
    g = j @ j.T
    assert torch.allclose(RG.cagrad_weights(g, c=0.0, rescale=0), torch.full((3,), 1 / 3, dtype=torch.float64))
    w0 = RG.cagrad_weights(g, c=0.8, rescale=0)
    assert torch.allclose(RG.cagrad_weights(g, c=0.8, rescale=1), w0 / 1.64)
    assert torch.allclose(RG.cagrad_weights(g, c=0.8, rescale=2), w0 / 1.8)
    unreached = torch.cat([j[:1], torch.zeros(1, 3, dtype=torch.float64), j[1:]])  # an objective with no gradient here
    want = torch.cat([w0[:1], torch.zeros(1, dtype=torch.float64), w0[1:]])
    assert torch.allclose(RG.cagrad_weights(unreached @ unreached.T, c=0.8, rescale=0), want, rtol=1e-12, atol=0)


def test_nash_mtl_solves_the_bargaining_equation_and_matches_torchjd_where_it_converges(gen):
    compared = 0
    for kind in ("plain", "ill"):
        for _ in range(20):
            j = jacobian(gen, kind)
            g, m = j @ j.T, j.shape[0]
            w = RG.nash_mtl_weights(g, max_norm=0)
            assert float((w * (g @ w) - 1).abs().max()) <= 1e-9, (kind, m)
            ref = torchjd.NashMTL(n_tasks=m, max_norm=0.0).weighting(j).double()
            if float((ref * (g @ ref) - 1).abs().max()) <= 1e-6:
                compared += 1
                assert rel_err(j.T @ w, j.T @ ref) <= 1e-5, (kind, m)
    assert compared >= 10, f"TorchJD converged on only {compared} of 40 draws"


def test_nash_mtl_clips_the_update_and_handles_zero_and_stationary_objectives():
    j = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    g = j @ j.T
    assert torch.allclose(RG.nash_mtl_weights(g, max_norm=0), torch.tensor([0.5, 2.0], dtype=torch.float64))
    clipped = RG.nash_mtl_weights(g, max_norm=1.0)  # ||J^T alpha||^2 = M at the Nash point: sqrt(2) > 1
    assert torch.allclose(clipped, torch.tensor([0.5, 2.0], dtype=torch.float64) / 2 ** 0.5)
    zero_row = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.5]], dtype=torch.float64)  # an objective that reaches nothing
    assert torch.allclose(RG.nash_mtl_weights(zero_row @ zero_row.T, max_norm=0),
                          torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64))
    opposed = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # Pareto-stationary: no Nash point
    assert float(RG.nash_mtl_weights(opposed @ opposed.T).abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["auto", *[b for b, i in mmgrad.backends().items() if i.available and "cpu" in i.devices]])
def test_ops_moo_weights_solves_every_baseline_as_its_method_does(gen, backend):
    """``mmgrad.ops.moo_weights(grams, name, **options)``: per group, the reference's
    function with those options, on every backend: solved on the host, bit for bit, but
    UPGrad and DualProj on triton, which solves them on the device (to 1e-8 of the host's:
    tests/test_device_dual_cone.py)."""
    grams = torch.stack([(lambda j: j @ j.T)(torch.randn(4, 9, generator=gen, dtype=torch.float64)) for _ in range(3)])
    cases = {"upgrad": {"reg_eps": 1e-3}, "dualproj": {"pref_vector": [0.4, 0.3, 0.2, 0.1]}, "cagrad": {"c": 0.9},
             "imtl_g": {}, "aligned_mtl": {"scale_mode": "median"}, "nash_mtl": {"max_norm": 0.0}}
    for name, options in cases.items():
        got = mmgrad.ops.moo_weights(grams, name, backend=backend, **options)
        want = torch.stack([getattr(RG, f"{name}_weights")(k, **options) for k in grams])
        assert got.dtype == torch.float64, name
        if backend == "triton" and name in ("upgrad", "dualproj"):
            assert torch.allclose(got, want, rtol=0, atol=1e-8 * float(want.abs().max())), name
        else:
            assert torch.equal(got, want), name
    got = mmgrad.ops.moo_weights(grams, "pcgrad", seed=4, step=9, backend=backend)
    assert torch.equal(got, torch.stack([RG.pcgrad_weights(k, pcgrad_orders(4, 9, g, 4)) for g, k in enumerate(grams)]))


def test_ops_moo_weights_names_a_wrong_method_or_option():
    grams = torch.eye(2, dtype=torch.float64)[None]
    with pytest.raises(ValueError, match="method must be one of .*'cagrad'.*'nash_mtl'"):
        mmgrad.ops.moo_weights(grams, "cagrd")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['cc'\] for method='cagrad'; it takes \['c', 'norm_eps', 'rescale'\]"):
        mmgrad.ops.moo_weights(grams, "cagrad", cc=1.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['c'\] for method='mgda'"):
        mmgrad.ops.moo_weights(grams, "mgda", c=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        mmgrad.ops.moo_weights(grams, "upgrad", backend="gpu")


def test_cagrad_solves_a_gramian_on_which_the_active_set_cycled():
    """A rank-2 Gramian of M = 4 (the second rank-deficient draw of seed 1394) made the
    active-set QP of CAGrad's search cycle (``nonnegative_qp`` raised); the search now
    retries that QP regularised, and the point is still solved on K itself."""
    gen = torch.Generator().manual_seed(1394)
    jacobian(gen, "deficient")
    j = jacobian(gen, "deficient")
    g = gramian(j)
    assert j.shape == (4, 2)
    assert rel_err(j.T @ cagrad_ours(g), j.T @ theirs("cagrad", g)) <= TOLERANCE["cagrad"]
