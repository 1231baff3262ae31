"""The Gramian baselines (``upgrad``, ``dualproj``, ``pcgrad``, ``imtl_g``, ``aligned_mtl``)
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
with the same orders).
"""

from __future__ import annotations

import pytest
import torch

import mmgrad
from mmgrad.methods import METHODS
from mmgrad.methods._pcgrad import pcgrad_orders
from mmgrad.reference import gramian as RG
from mmgrad.tools.verify import rel_err

torchjd = pytest.importorskip("torchjd.aggregation", reason="torchjd==0.18.0 is a test dependency (make test installs it)")

BASELINES = ("upgrad", "dualproj", "pcgrad", "imtl_g", "aligned_mtl")


def jacobian(gen: torch.Generator, kind: str) -> torch.Tensor:
    """M x R float64 Jacobians: well-conditioned, ill-conditioned (row norms over 6 decades)
    or rank-deficient (R < M)."""
    m = int(torch.randint(2, 9, (), generator=gen))
    r = {"plain": 12, "ill": 12, "deficient": max(1, m - 2)}[kind]
    j = torch.randn(m, r, generator=gen, dtype=torch.float64)
    if kind == "ill":
        j = j * torch.logspace(-3, 3, m, dtype=torch.float64)[:, None]
    return j


def theirs(name: str, gram: torch.Tensor, **options) -> torch.Tensor:
    cls = {"upgrad": torchjd.UPGradWeighting, "dualproj": torchjd.DualProjWeighting, "imtl_g": torchjd.IMTLGWeighting,
           "aligned_mtl": torchjd.AlignedMTLWeighting}[name]
    return cls(**options)(gram)


OURS = {"upgrad": RG.upgrad_weights, "dualproj": RG.dualproj_weights, "imtl_g": RG.imtl_g_weights,
        "aligned_mtl": RG.aligned_mtl_weights}
TOLERANCE = {"upgrad": 1e-8, "dualproj": 1e-8, "imtl_g": 1e-12, "aligned_mtl": 1e-12}


@pytest.mark.parametrize("kind", ["plain", "ill", "deficient"])
@pytest.mark.parametrize("name", sorted(OURS))
def test_the_weights_are_torchjds(gen, name, kind):
    for _ in range(20):
        j = jacobian(gen, kind)
        g = j @ j.T
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


@pytest.mark.parametrize("name", sorted(OURS) + ["pcgrad"])
def test_permuted_objectives_permute_the_weights_and_scale_changes_nothing(gen, name):
    for _ in range(10):
        j = jacobian(gen, "plain")
        g, m = j @ j.T, j.shape[0]
        solve = (lambda k: RG.pcgrad_weights(k, [list(range(m))] * m)) if name == "pcgrad" else OURS[name]
        w = solve(g)
        assert rel_err(solve(7.5 * g), w) <= 1e-9, "scale"
        if name == "pcgrad":  # its result depends on the order, which a permutation changes
            continue
        perm = torch.randperm(m, generator=gen)
        assert rel_err(solve(g[perm][:, perm]), w[perm]) <= 1e-8, "permutation"


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_checks_its_options_and_refuses_sync_free(name):
    lin = torch.nn.Linear(3, 2)
    cls = METHODS[name]
    assert cls.family == "gramian" and not cls.sync_free and cls.defaults["lagged"] is False
    if mmgrad.backends()["triton"].available:
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
