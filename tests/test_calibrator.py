"""FusedCalibrator: the gradients it writes, training, checkpoints and misuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmgrad
from mmgrad import reference as R
from mmgrad.tools.verify import TOLERANCE, rel_err

from conftest import assert_bit_identical, kernel_backends, mmpareto_oracle, tensor_offsets
from toy_model import TwoView, batch

BACKENDS = ["reference", *kernel_backends()]


def per_objective_grads(model, params, b):
    """Ground truth: each loss's gradient by a separate autograd.grad, None -> zeros."""
    rows = []
    for loss in model.losses(*b):
        gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows)


def _groups_offsets(model):
    sizes = [sum(p.numel() for p in g["params"]) for g in model.groups()]
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["bogc", "mgda", "mmpareto", "mimo", "mean"])
def test_written_gradient_is_the_reference_function(gen, backend, method):
    torch.manual_seed(0)
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, backend=backend)
    params = cal.params
    off = _groups_offsets(model)
    m_state = torch.zeros(3, cal.num_elements)
    v_state = torch.zeros(3, cal.num_elements)
    for step in range(1, 4):
        b = batch(gen)
        g = per_objective_grads(model, params, b).double()
        losses = model.losses(*b)
        cal.backward(losses)  # writes the calibrated gradient, as loss.backward() writes its own
        got = torch.cat([p.grad.reshape(-1) for p in params])
        if method == "bogc":
            want, m_state, v_state, _ = R.bogc_step(g, m_state.double(), v_state.double(), step, group_offsets=off)
        elif method == "mmpareto":  # the official step: the magnitude rule per tensor
            want, _ = mmpareto_oracle(g, tensor_offsets(params), cal.layout.group_of)
        else:
            k = R.gram(g, group_offsets=off)
            lv = torch.stack([x.detach() for x in losses]).double()
            if method == "mgda":
                alpha = torch.stack([R.mgda_weights(kk) for kk in k])
            elif method == "mimo":
                alpha = R.mimo_weights(lv).expand(3, 3)
            else:
                alpha = torch.full((3, 3), 1 / 3, dtype=torch.float64)
            want = R.combine(g, alpha, group_offsets=off)
        assert rel_err(got, want) <= 2e-5, f"step {step}"
        for p in params:  # a plain SGD step so the next step sees new parameters
            p.data -= 0.1 * p.grad
            p.grad = None


def test_uncalibrated_parameters_get_the_summed_gradient(gen):
    model = TwoView()
    cal = mmgrad.FusedCalibrator([{"params": model.enc_a.parameters()}], 3, method="mgda")
    others = [*model.fuse.parameters(), *model.head_b.parameters(), *model.enc_b.parameters()]
    b = batch(gen)
    want = [sum(g for g in gs if g is not None) for gs in zip(*[torch.autograd.grad(l, others, allow_unused=True, retain_graph=True) for l in model.losses(*b)])]
    cal.backward(model.losses(*b))
    for p, w in zip(others, want):
        assert torch.allclose(p.grad, w, rtol=1e-6, atol=1e-7)


def test_sum_trains_bit_for_bit_like_plain_joint_training(gen):
    torch.manual_seed(1)
    plain = TwoView()
    calibrated = copy.deepcopy(plain)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt_c = torch.optim.AdamW(calibrated.parameters(), lr=1e-2)
    cal = mmgrad.FusedCalibrator(calibrated.groups(), 3, method="sum").attach(opt_c)
    for _ in range(20):
        b = batch(gen)
        sum(plain.losses(*b)).backward()
        opt_p.step()
        opt_p.zero_grad()
        cal.backward(calibrated.losses(*b))
        opt_c.step()
        opt_c.zero_grad()
    for p, q in zip(plain.parameters(), calibrated.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd", "sgd-momentum", "adam", "adamw"],
)
@pytest.mark.parametrize("method", ["bogc", "mgda", "mmpareto", "mimo", "mean", "sum"])
def test_training_lowers_the_loss_with_every_optimizer(gen, make_opt, method):
    torch.manual_seed(2)
    model = TwoView()
    model.head_a.weight.requires_grad_(False)  # a frozen parameter in the optimizer and the model
    opt = make_opt([{"params": [*model.enc_a.parameters(), *model.enc_b.parameters()]},
                    {"params": [p for n, p in model.named_parameters() if not n.startswith("enc")], "lr": 1e-2}])
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method).attach(opt)
    fixed = batch(gen, n=64)
    start = sum(model.losses(*fixed)).item()
    for _ in range(30):
        cal.backward(model.losses(*fixed))
        opt.step()
        opt.zero_grad()
    assert sum(model.losses(*fixed)).item() < start
    assert model.head_a.weight.grad is None


@pytest.mark.parametrize("method", ["bogc", "mgda"])
def test_cpu_backend_trains_like_the_reference(gen, method):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu kernels not built")
    torch.manual_seed(3)
    a = TwoView()
    b_model = copy.deepcopy(a)
    runs = []
    for model, backend in ((a, "reference"), (b_model, "cpu")):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, backend=backend).attach(opt)
        g2 = torch.Generator().manual_seed(7)
        for _ in range(10):
            cal.backward(model.losses(*batch(g2)))
            opt.step()
            opt.zero_grad()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert rel_err(runs[1], runs[0]) <= 1e-5


def test_sample_estimator_matches_the_reference(gen):
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc", estimator="sample")
    chunks = [batch(gen, n=8) for _ in range(3)]
    samples = torch.stack([per_objective_grads(model, cal.params, c) for c in chunks]).double()
    cal.backward([model.losses(*c) for c in chunks])
    cal.step()
    want, _ = R.bogc_sample_step(samples, group_offsets=_groups_offsets(model))
    assert rel_err(torch.cat([p.grad.reshape(-1) for p in cal.params]), want) <= 2e-5


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_backward_modes_fill_the_same_buffer(gen, mode):
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="mgda", backward_mode=mode)
    b = batch(gen)
    want = per_objective_grads(model, cal.params, b)
    cal.backward(model.losses(*b))
    assert rel_err(cal.layout.dense('grads'), want) <= 1e-6
    assert torch.equal(cal.layout.dense('grads')[1][cal.group_offsets[1]:], torch.zeros_like(cal.layout.dense('grads')[1][cal.group_offsets[1]:]))


@pytest.mark.parametrize("method, options, hidden", [
    ("bogc", {}, 8), ("bogc", {"estimator": "sample"}, 8), ("mgda", {"lagged": True}, 8), ("mmpareto", {}, 8),
    # segments of 40+ chunks of 512: several blocks of the reductions
    ("bogc", {}, 3000), ("mgda", {"lagged": True}, 3000)])
def test_state_dict_round_trip_resumes_identically(gen, method, options, hidden):
    torch.manual_seed(4)
    data = [batch(gen) if method != "bogc" or not options else [batch(gen, 8) for _ in range(2)] for _ in range(10)]

    def losses(model, d):
        return [model.losses(*c) for c in d] if options.get("estimator") == "sample" else model.losses(*d)

    def make(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return opt, mmgrad.FusedCalibrator(model.groups(), 3, method=method, **options).attach(opt)

    model = TwoView(hidden=hidden)
    opt, cal = make(model)
    for d in data[:5]:
        cal.backward(losses(model, d))
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), cal.state_dict()))
    for d in data[5:]:
        cal.backward(losses(model, d))
        opt.step()
        opt.zero_grad()
    model2 = TwoView(hidden=hidden)
    opt2, cal2 = make(model2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    cal2.load_state_dict(saved[2])
    for d in data[5:]:
        cal2.backward(losses(model2, d))
        opt2.step()
        opt2.zero_grad()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def _poisoned_losses(model, b, which):
    losses = model.losses(*b)
    losses[which] = losses[which] * torch.tensor(float("inf"))
    return losses


@pytest.mark.parametrize("method", ["bogc", "mgda", "mimo", "sum"])
def test_nonfinite_gradient_raises_naming_objective_and_leaves_state(gen, method):
    model = TwoView()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method).attach(opt)
    cal.backward(model.losses(*batch(gen)))
    opt.step()
    opt.zero_grad()
    before = copy.deepcopy(cal.state_dict())
    with pytest.raises(mmgrad.NonFiniteGradientError, match="objective 1" if method != "sum" else "not finite"):
        cal.backward(_poisoned_losses(model, batch(gen), 1))  # backward() calibrates, so it raises
    with pytest.raises(RuntimeError, match="without FusedCalibrator.backward"):
        opt.step()  # the step was abandoned
    after = cal.state_dict()
    assert after["step_count"] == before["step_count"]
    assert ("mean" in before) == (method == "bogc")  # the check below must not pass by missing keys
    for key in ("mean", "var"):
        if key in before:
            assert_bit_identical(after[key], before[key], key)


@pytest.mark.parametrize("method", ["bogc", "mgda", "mmpareto", "mimo", "sum"])
def test_skip_nonfinite_leaves_optimizer_and_calibrator_bit_identical(gen, method):
    model = TwoView()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, skip_nonfinite=True).attach(opt)
    for _ in range(3):
        cal.backward(model.losses(*batch(gen)))
        opt.step()
        opt.zero_grad()
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), cal.state_dict()))
    cal.backward(_poisoned_losses(model, batch(gen), 2))
    opt.step()
    opt.zero_grad()
    after = (model.state_dict(), opt.state_dict(), cal.state_dict())
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v)
    for pid, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(after[1]["state"][pid][k], v)
    assert after[2]["step_count"] == before[2]["step_count"]
    assert ("mean" in before[2]) == (method == "bogc")
    if method == "bogc":
        assert_bit_identical(after[2]["mean"], before[2]["mean"], "mean")
        assert_bit_identical(after[2]["var"], before[2]["var"], "var")
    # and training goes on afterwards
    cal.backward(model.losses(*batch(gen)))
    opt.step()
    assert cal.state_dict()["step_count"] == before[2]["step_count"] + 1


def test_step_then_clip_then_optimizer_step(gen):
    model = TwoView()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc").attach(opt)
    cal.backward(model.losses(*batch(gen)))
    assert cal.step()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    clipped = [p.grad.clone() for p in cal.params]
    before = [p.detach().clone() for p in cal.params]
    opt.step()  # the hook sees the step was calibrated already and does not recalibrate
    for p, b, g in zip(cal.params, before, clipped):
        assert torch.allclose(p, b - 0.1 * g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_float64_and_half_parameters(gen, dtype):
    """The gradient written in the parameters' dtype is the reference step of the same
    per-objective gradients (one output rounding for half dtypes, docs/spec.md, decision 11)."""
    torch.manual_seed(0)
    model = TwoView(dtype)
    cal = mmgrad.FusedCalibrator(model.groups(), 3)
    b = batch(gen, dtype=dtype)
    g = per_objective_grads(model, cal.params, b).double()
    cal.backward(model.losses(*b))
    assert cal.step()
    assert all(p.grad.dtype == dtype for p in cal.params)
    got = torch.cat([p.grad.reshape(-1) for p in cal.params]).double()
    zeros = torch.zeros_like(g)
    want, _, _, _ = R.bogc_step(g, zeros, zeros, 1, group_offsets=_groups_offsets(model))
    assert rel_err(got, want) <= TOLERANCE[dtype]  # fp64 1e-10, half 1e-2 (mmgrad.tools.verify)


@pytest.mark.parametrize("method", ["bogc", "mgda", "sum"])
def test_grad_scaler_calibrates_unscaled_gradients(gen, method):
    """A power-of-two loss scale is exact, so a scaled run equals an unscaled one bit for bit."""
    data = [batch(gen) for _ in range(4)]
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        model = TwoView()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method).attach(opt)
        for d in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = model.losses(*d)
            cal.backward(losses, scaler=scaler)
            if scaler is None:
                opt.step()
            else:  # backward calibrated already; the scaler unscales and steps
                assert cal.diagnostics and "skipped" not in cal.diagnostics
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["bogc", "mgda", "mimo", "sum"])
def test_grad_scaler_overflow_skips_and_leaves_calibrator_state(gen, method):
    torch.manual_seed(0)
    model = TwoView()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    cal.backward(model.losses(*batch(gen)), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), cal.state_dict()))
    cal.backward(_poisoned_losses(model, batch(gen), 1), scaler=scaler)  # overflow, as a too-large scale gives
    assert bool(cal.diagnostics["skipped"])
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**7  # the scaler saw the overflow and backed off
    after = (model.state_dict(), opt.state_dict(), cal.state_dict())
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v)
    assert after[2]["step_count"] == before[2]["step_count"]
    assert ("mean" in before[2]) == (method == "bogc")
    for key in ("mean", "var"):
        if key in before[2]:
            assert_bit_identical(after[2][key], before[2][key], key)


def test_sparse_gradients_are_densified_by_the_loop_backward(gen):
    emb = nn.Embedding(10, 4, sparse=True)
    idx = torch.randint(0, 10, (7,), generator=gen)
    expected = torch.stack([torch.zeros(10, 4).index_add_(0, idx, torch.ones(7, 4)).reshape(-1),
                            torch.zeros(10, 4).index_add_(0, idx, 2 * emb(idx).detach()).reshape(-1)])
    cal = mmgrad.FusedCalibrator(emb.parameters(), 2, method="mgda")
    out = emb(idx)
    cal.backward([out.sum(), out.pow(2).sum()])
    assert torch.allclose(cal.layout.dense('grads'), expected, rtol=1e-6, atol=1e-6)
    assert cal.step() and emb.weight.grad.layout == torch.strided
