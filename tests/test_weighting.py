"""``mmgrad.methods.Weighting``: a Gramian method defined here, in one class, runs through
the calibrator on every backend and equals the float64 oracle; registration is checked."""

from __future__ import annotations

import pytest
import torch

import mmgrad
from mmgrad import reference as R
from mmgrad.methods import METHODS, Weighting, register
from mmgrad.tools.verify import rel_err

from conftest import kernel_backends
from toy_model import TwoView, batch


@register
class InverseNorm(Weighting):
    """Each group's objectives weighted by ``1 / ||g_m||^power``, normalised to sum 1
    (objectives that do not reach the group: 0)."""

    name = "test-inverse-norm"
    defaults = {"power": 1.0}

    @classmethod
    def check_options(cls, options):
        super().check_options(options)
        if not isinstance(options["power"], (int, float)) or options["power"] <= 0:
            raise ValueError(f"power must be > 0; got {options['power']!r}")

    def weights(self, grams, losses):
        norms = torch.diagonal(grams, dim1=1, dim2=2).clamp_min(0).sqrt()
        inv = torch.where(norms > 0, norms.clamp_min(1e-300) ** -self.options["power"], torch.zeros_like(norms))
        return inv / inv.sum(dim=1, keepdim=True).clamp_min(1e-300)


def oracle_weights(k, power):
    norms = torch.diagonal(k, dim1=1, dim2=2).sqrt()
    inv = torch.where(norms > 0, norms ** -power, torch.zeros_like(norms))
    return inv / inv.sum(dim=1, keepdim=True)


def _grads(model, params, losses):
    return torch.stack([torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1) for p, d in zip(
        params, torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))]) for loss in losses]).double()


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
@pytest.mark.parametrize("options", [{}, {"power": 2.0}, {"lagged": True}])
def test_a_weighting_defined_in_one_class_runs_on_every_backend(gen, backend, options):
    torch.manual_seed(0)
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="test-inverse-norm", backend=backend, **options)
    sizes = [sum(p.numel() for p in grp) for grp in cal.groups]
    off = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    power, previous = options.get("power", 1.0), None
    for step in range(3):
        losses = model.losses(*batch(gen))
        g = _grads(model, cal.params, losses)
        fresh = oracle_weights(R.gram(g, group_offsets=off), power)
        alpha = previous if options.get("lagged") and previous is not None else fresh
        previous = fresh
        cal.backward(losses)
        got = torch.cat([p.grad.reshape(-1) for p in cal.params]).double()
        assert rel_err(got, R.combine(g, alpha, group_offsets=off)) <= 2e-5, f"step {step}"
        model.zero_grad()
    assert cal.options["lagged"] is options.get("lagged", False)  # every weighting takes lagged


def test_a_weighting_checks_its_options_and_declares_what_it_cannot_do():
    model = TwoView()
    with pytest.raises(ValueError, match="power must be > 0"):
        mmgrad.FusedCalibrator(model.groups(), 3, method="test-inverse-norm", power=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['beta'\]"):
        mmgrad.FusedCalibrator(model.groups(), 3, method="test-inverse-norm", beta=0.5)
    if mmgrad.backends()["triton"].available:  # its weights are not declared free of host reads
        with pytest.raises(ValueError, match="sync_free=True: method 'test-inverse-norm' declares no solve"):
            mmgrad.FusedCalibrator(model.groups(), 3, method="test-inverse-norm", backend="triton", sync_free=True,
                                   skip_nonfinite=True)


def test_register_refuses_what_is_not_a_method_or_a_taken_name():
    class Clash(Weighting):
        name = "mgda"

    with pytest.raises(ValueError, match="method name 'mgda' is taken by mmgrad.methods._moo.MGDA"):
        register(Clash)
    with pytest.raises(TypeError, match="subclass of mmgrad.methods.Method"):
        register(int)

    class Nameless(Weighting):
        pass

    with pytest.raises(ValueError, match="name must be a non-empty string"):
        register(Nameless)
    assert register(InverseNorm) is InverseNorm and METHODS["test-inverse-norm"] is InverseNorm


@pytest.mark.parametrize("method", ["mgda", "mmpareto"])
def test_the_builtin_weightings_formula_is_the_reference(gen, method):
    """MGDA and MMPareto are Weightings: their ``weights`` is the reference's formula, and
    the backends' solvers (``solve``) agree with it to the certificate."""
    cls = METHODS[method]
    assert issubclass(cls, Weighting) and cls.defaults["lagged"] is False and cls.sync_free
    a = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    grams = a @ a.transpose(1, 2)
    got = cls(dict(cls.defaults), None).weights(grams, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(got, R.moo_weights(grams, method), rtol=0, atol=1e-12)


def test_the_calibrator_reads_each_methods_declared_kernels_and_limits():
    """A method says which backend functions its step calls (``kernels``) and its limits
    (``unsupported``); the calibrator refuses, at construction and naming both, a backend
    that cannot run it, instead of failing inside the first step."""
    model = TwoView()

    class NeedsOpinions(Weighting):
        name = "test-needs-opinions"
        kernels = (*Weighting.kernels, "opinions")

        def weights(self, grams, losses):
            return torch.full(grams.shape[:2], 1.0 / grams.shape[1], dtype=torch.float64)

    register(NeedsOpinions)
    try:
        for backend in kernel_backends():
            module = mmgrad.ops.backend_module(backend, torch.device("cpu"))
            if mmgrad.ops.implements(module, "opinions"):
                mmgrad.FusedCalibrator(model.groups(), 3, method="test-needs-opinions", backend=backend)
            else:
                with pytest.raises(ValueError, match=f"method='test-needs-opinions' cannot run on backend '{backend}': "
                                                     "it has no kernel for opinions"):
                    mmgrad.FusedCalibrator(model.groups(), 3, method="test-needs-opinions", backend=backend)
    finally:
        del METHODS["test-needs-opinions"]
    # the device solver holds at most 16 objectives; the reference's Wolfe solver any M
    params = [torch.nn.Parameter(torch.randn(4))]
    for backend in kernel_backends():
        with pytest.raises(ValueError, match=f"cannot run on backend '{backend}': its MOO solver takes at most 16 "
                                             "objectives, not M = 17"):
            mmgrad.FusedCalibrator(params, 17, method="mgda", backend=backend)
    mmgrad.FusedCalibrator(params, 17, method="mgda", backend="reference")
    assert {m: METHODS[m].family for m in mmgrad.methods.BUILTIN} == {
        "bogc": "bogc", "mgda": "gramian", "mmpareto": "gramian", "mimo": "weighted", "ogm": "weighted",
        "sum": "sum", "mean": "weighted", "upgrad": "gramian", "dualproj": "gramian", "pcgrad": "gramian",
        "imtl_g": "gramian", "aligned_mtl": "gramian", "cagrad": "gramian", "nash_mtl": "gramian"}
