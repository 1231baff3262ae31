"""Every option of every method, through ``FusedCalibrator``, against the float64 oracle.

Each case sets one option to a value that changes the result on this data (asserted:
the oracle with the default differs by more than 1e-3), trains three steps on every
backend, and compares the written ``.grad`` with the oracle's. An option the calibrator
ignored, or passed to the wrong place, fails here; ``make mutate`` checks that it does.
"""

from __future__ import annotations

import pytest
import torch

import mmgrad
from mmgrad import reference as R
from mmgrad.methods._ogm import ge_noise
from mmgrad.tools.verify import rel_err

from mmgrad.reference.gramian import pcgrad_orders

from conftest import kernel_backends, mmpareto_oracle, tensor_offsets
from toy_model import TwoView, batch

STEPS = 3
OGM_OBJECTIVES = [1, 2, 1]  # TwoView's third group (``extra``) is no view's own: it joins view 1
CASES = [
    ("bogc", {"beta": 0.5}), ("bogc", {"gamma": 4.0}), ("bogc", {"eps": 1e-3}),
    ("bogc", {"confidence": "certainty"}), ("bogc", {"confidence": "none"}), ("bogc", {"weights": "precision"}),
    ("bogc", {"rescale": False}),
    ("mgda", {"normalize": "l2"}), ("mgda", {"normalize": "loss"}), ("mgda", {"lagged": True}),
    ("mmpareto", {"magnitude": 4.0}), ("mmpareto", {"lagged": True}), ("mmpareto", {"scope": "group"}),
    ("mmpareto", {"scope": "group", "magnitude": 4.0}),  # the group rule's own use of magnitude
    ("mimo", {"rho": 0.2}), ("mimo", {"tau": 5.0}),
    ("ogm", {"alpha": 3.0}), ("ogm", {"unimodal": 0.7}), ("ogm", {"noise": False}), ("ogm", {"seed": 7}),
    ("ogm", {"noise_std": "group"}), ("ogm", {"modulate": "conv"}),
    ("upgrad", {"pref_vector": [0.7, 0.2, 0.1]}), ("upgrad", {"reg_eps": 0.5}), ("dualproj", {"pref_vector": [0.7, 0.2, 0.1]}),
    ("aligned_mtl", {"scale_mode": "rmse"}), ("aligned_mtl", {"pref_vector": [0.7, 0.2, 0.1]}), ("pcgrad", {"lagged": True}),
    ("cagrad", {"c": 1.5}), ("cagrad", {"rescale": 0}), ("nash_mtl", {"max_norm": 0.0}),
]
GRAMIAN = {"upgrad", "dualproj", "aligned_mtl", "pcgrad", "imtl_g", "cagrad", "nash_mtl"}
# TwoView has no convolution: OGM modulates every tensor here unless a case says otherwise
OGM_BASE = {"modulate": "all"}


def _ids(case):
    method, options = case
    return f"{method}-" + "-".join(f"{k}={v}" for k, v in options.items())


class Oracle:
    """The method's step in float64 from the per-objective gradients ``g`` (M x N) and the
    loss values, with its own state: docs/spec.md §3-4 written out, option by option."""

    def __init__(self, method, options, offsets):
        self.method, self.off = method, offsets
        defaults = dict(mmgrad.methods.METHODS[method].defaults)
        self.o = {**defaults, **options}
        self.steps, self.mean, self.var, self.prev = 0, None, None, None

    def step(self, g, lv):
        o, off = self.o, self.off
        self.steps += 1
        groups, m = off.numel() - 1, g.shape[0]
        if self.method == "bogc":
            if self.mean is None:
                self.mean, self.var = torch.zeros_like(g), torch.zeros_like(g)
            out, self.mean, self.var, _ = R.bogc_step(
                g, self.mean, self.var, self.steps, beta=o["beta"], gamma=o["gamma"], eps=o["eps"],
                confidence=o["confidence"], weights=o["weights"], rescale=o["rescale"], group_offsets=off)
            return out
        if self.method in ("mgda", "mmpareto"):
            if self.method == "mmpareto" and o["scope"] == "tensor":  # the official rule, per tensor
                parts = self.tensor_offsets
                _, fresh = mmpareto_oracle(g, parts, self.group_of, o["magnitude"])
            else:
                parts = off
                kw = {"normalize": o["normalize"], "losses": lv} if self.method == "mgda" else {"magnitude": o["magnitude"]}
                fresh = R.moo_weights(R.gram(g, group_offsets=off), self.method, **kw)
            alpha = self.prev if o["lagged"] and self.prev is not None else fresh
            self.prev = fresh  # lagged: the next step combines with these
            return R.combine(g, alpha, group_offsets=parts)
        if self.method in GRAMIAN:  # the reference's formulas, per group, with the options
            kw = {k: v for k, v in o.items() if k != "lagged"}
            grams = R.gram(g, group_offsets=off)
            if self.method == "pcgrad":
                fresh = torch.stack([R.gramian.pcgrad_weights(k, pcgrad_orders(o["seed"], self.steps, grp, m))
                                     for grp, k in enumerate(grams)])
            else:
                fresh = torch.stack([getattr(R.gramian, f"{self.method}_weights")(k, **kw) for k in grams])
            alpha = self.prev if o["lagged"] and self.prev is not None else fresh
            self.prev = fresh
            return R.combine(g, alpha, group_offsets=off)
        if self.method == "mimo":
            return R.combine(g, R.mimo_weights(lv, o["rho"], o["tau"]).expand(groups, m).contiguous(), group_offsets=off)
        assert self.method == "ogm"
        views = sorted(set(OGM_OBJECTIVES))
        k_view, _ = R.ogm_coefficients(lv[views], o["alpha"])
        toff = self.tensor_offsets
        modulated = [o["modulate"] == "all" or p.dim() == 4 for p in self.params]
        alpha = torch.zeros(len(modulated), m, dtype=torch.float64)  # per tensor
        for i, grp in enumerate(self.group_of):
            view = OGM_OBJECTIVES[grp]
            alpha[i, 0] = k_view[views.index(view)] if modulated[i] else 1.0
            alpha[i, view] += o["unimodal"]
        out = R.combine(g, alpha, group_offsets=toff)
        if o["noise"]:  # GE on the modulated tensors
            group_std = [out[int(off[grp]):int(off[grp + 1])].std() for grp in range(groups)]  # before any noise
            for i, grp in enumerate(self.group_of):
                lo, hi = int(toff[i]), int(toff[i + 1])
                if not modulated[i]:
                    continue
                if o["noise_std"] == "tensor":  # N(0, std + 1e-8), std of the unmodulated gradient
                    view = OGM_OBJECTIVES[grp]
                    scale = (g[0, lo:hi] + o["unimodal"] * g[view, lo:hi]).std() + 1e-8
                else:  # the group output's unbiased std
                    scale = group_std[grp]
                out[lo:hi] += ge_noise(o["seed"], self.steps, i, 0, hi - lo, "cpu").double() * scale
        return out


def _run(method, options, backend, gen_seed):
    """Three steps of TwoView through the calibrator and through the oracle, same data."""
    torch.manual_seed(0)
    model = TwoView()
    extra = {"group_objectives": OGM_OBJECTIVES} if method == "ogm" else {}
    if method == "ogm":
        options = {**OGM_BASE, **options}
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, backend=backend, **extra, **options)
    params = cal.params
    sizes = [sum(p.numel() for p in grp) for grp in cal.groups]
    off = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    oracle, default = Oracle(method, options, off), Oracle(method, OGM_BASE if method == "ogm" else {}, off)
    for o in (oracle, default):  # OGM's noise is drawn per parameter, MMPareto's rule applied per tensor
        o.index = {id(p): i for i, p in enumerate(params)}
        o.tensor_offsets, o.group_of, o.params = tensor_offsets(params), cal.layout.group_of, params
        o.params_of_group = lambda grp: cal.groups[grp]
    gen = torch.Generator().manual_seed(gen_seed)
    for step in range(1, STEPS + 1):
        losses = model.losses(*batch(gen))
        g = torch.stack([torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1) for p, d in zip(
            params, torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))]) for loss in losses]).double()
        lv = torch.stack([loss.detach() for loss in losses]).double()
        want, plain = oracle.step(g, lv), default.step(g, lv)
        cal.backward(losses)
        got = torch.cat([p.grad.reshape(-1) for p in params]).double()
        for p in model.parameters():  # a plain SGD step, so the next step sees new parameters
            p.data -= 0.1 * p.grad
            p.grad = None
        yield step, got, want, plain


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_option_changes_the_result_as_the_oracle_says(gen, case, backend):
    method, options = case
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    moved = 0.0
    for step, got, want, plain in _run(method, options, backend, seed):
        assert rel_err(got, want) <= 2e-5, f"step {step}: {rel_err(got, want):.2e} from the oracle"
        moved = max(moved, rel_err(plain, want))
    assert moved > 1e-3, f"{options} moves the oracle by only {moved:.1e} here: the case tests nothing"
