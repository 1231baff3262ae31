"""Every misuse a user can hit gives a clear error naming the argument (docs/errors.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmgrad
from mmgrad.kernels.gpu_ops import GpuOps


def lin():
    return nn.Linear(3, 2)


def losses_of(layer, k=2):
    x = torch.randn(4, 3)
    return [layer(x).pow(i + 1).mean() for i in range(k)]


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, method="gradnorm"), ValueError, "method must be one of"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, method=3), TypeError, "method must be a string"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, methd="bogc"), TypeError, r"unknown option\(s\) \['methd'\]"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, method="mgda", beta=0.9), TypeError, "unknown option.*beta.*mgda"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 0), ValueError, "num_objectives must be >= 1"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2.0), TypeError, "num_objectives must be an int"),
        (lambda: mmgrad.FusedCalibrator([], 2), ValueError, "params is empty"),
        (lambda: mmgrad.FusedCalibrator(torch.zeros(3, requires_grad=True), 2), TypeError, "single tensor"),
        (lambda: mmgrad.FusedCalibrator([1.0], 2), TypeError, "must hold tensors"),
        (lambda: mmgrad.FusedCalibrator([{"params": lin().parameters(), "lr": 0.1}], 2), ValueError, "only the key 'params'"),
        (lambda: (lambda p: mmgrad.FusedCalibrator([p, p], 2))(nn.Parameter(torch.zeros(2))), ValueError, "appears twice"),
        (lambda: mmgrad.FusedCalibrator([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))], 2), ValueError, "one device"),
        (lambda: mmgrad.FusedCalibrator([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))], 2), TypeError, "one dtype"),
        (lambda: mmgrad.FusedCalibrator([nn.Parameter(torch.zeros(2), requires_grad=False)], 2), ValueError, "requires_grad=False"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, beta=1.5), ValueError, "beta"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, confidence="max"), ValueError, "confidence"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, estimator="bayes"), ValueError, "estimator"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, skip_nonfinite=1), TypeError, "skip_nonfinite must be a bool"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, backward_mode="vmap"), ValueError, "backward_mode"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, method="mgda", normalize="max"), ValueError, "normalize"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, method="mimo", tau=0.0), ValueError, "tau"),
        (lambda: mmgrad.FusedCalibrator(lin().parameters(), 2, backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_construction_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_wrong_number_of_losses():
    layer = lin()
    cal = mmgrad.FusedCalibrator(layer.parameters(), 3)
    with pytest.raises(ValueError, match="num_objectives=3"):
        cal.backward(losses_of(layer, 2))


def test_non_scalar_loss():
    layer = lin()
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2)
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar"):
        cal.backward([layer(torch.randn(4, 3)).mean(), layer(torch.randn(4, 3))])


def test_loss_without_grad_and_wrong_container():
    layer = lin()
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2)
    with pytest.raises(ValueError, match=r"losses\[0\] does not require grad"):
        cal.backward([torch.tensor(1.0), layer(torch.randn(4, 3)).mean()])
    with pytest.raises(TypeError, match="list/tuple"):
        cal.backward(x for x in losses_of(layer))
    with pytest.raises(TypeError, match=r"losses\[1\] must be a tensor"):
        cal.backward([layer(torch.randn(4, 3)).mean(), 1.0])


def test_sample_estimator_needs_two_micro_batches():
    layer = lin()
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2, estimator="sample")
    with pytest.raises(ValueError, match="S >= 2"):
        cal.backward([losses_of(layer)])


def test_step_without_backward():
    layer = lin()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2).attach(opt)
    with pytest.raises(RuntimeError, match="needs backward"):
        cal.step()
    opt.step()  # no gradient at all: nothing to calibrate (DCP's state_dict helpers step so)
    sum(losses_of(layer)).backward()
    with pytest.raises(RuntimeError, match="without FusedCalibrator.backward"):
        opt.step()  # a plain backward's gradient would train uncalibrated
    opt.zero_grad()
    cal.backward(losses_of(layer))
    opt.step()
    with pytest.raises(RuntimeError, match="without FusedCalibrator.backward"):
        opt.step()  # a second step after one backward


def test_attach_twice_and_not_an_optimizer():
    layer = lin()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2).attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        cal.attach(opt)
    cal.detach()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        cal.attach("sgd")


def test_load_state_dict_mismatch():
    a = mmgrad.FusedCalibrator(lin().parameters(), 2)
    b = mmgrad.FusedCalibrator(nn.Linear(4, 2).parameters(), 2)
    with pytest.raises(ValueError, match="num_elements"):
        b.load_state_dict(a.state_dict())
    c = mmgrad.FusedCalibrator(lin().parameters(), 2, method="mgda")
    with pytest.raises(ValueError, match="method"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(TypeError, match="state must be a dict"):
        a.load_state_dict([1])


def test_reference_function_errors():
    R = mmgrad.reference
    with pytest.raises(ValueError, match="gram must be square"):
        R.mgda_weights(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        R.mgda_weights(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="losses must be 1-D"):
        R.mimo_weights(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="alpha must have shape"):
        R.combine(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one opinion"):
        R.ds_combine(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(TypeError, match="step must be an int"):
        R.ema_moments(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 1.0, 0.9)


def test_sparse_misuse():
    with pytest.raises(TypeError, match="params must be dense"):
        mmgrad.FusedCalibrator([torch.zeros(3, 2).to_sparse().requires_grad_()], 2)
    emb = nn.Embedding(10, 4, sparse=True)
    cal = mmgrad.FusedCalibrator(emb.parameters(), 2, backward_mode="batched")
    out = emb(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="batched.*sparse gradients.*loop"):
        cal.backward([out.sum(), out.pow(2).sum()])
    with pytest.raises(TypeError, match="SparseAdam"):
        mmgrad.FusedCalibrator(lin().parameters(), 2).attach(torch.optim.SparseAdam(nn.Embedding(3, 2, sparse=True).parameters()))


def test_a_parameter_in_two_live_calibrators():
    layer = lin()
    first = mmgrad.FusedCalibrator(layer.parameters(), 2)
    with pytest.raises(ValueError, match="already calibrated by FusedCalibrator"):
        mmgrad.FusedCalibrator([layer.bias], 2)
    del first  # once the first is gone, the parameters are free again
    mmgrad.FusedCalibrator(layer.parameters(), 2)


def test_grad_scaler_misuse():
    layer = lin()
    cal = mmgrad.FusedCalibrator(layer.parameters(), 2)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        cal.backward(losses_of(layer), scaler=2.0)


def test_process_group_without_distributed():
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        mmgrad.FusedCalibrator(lin().parameters(), 2, process_group=object())
    with pytest.raises(ValueError, match="bucket_bytes"):
        mmgrad.distributed.GradientAverager(None, bucket_bytes=0)


def test_cuda_backend_without_cuda_says_why():
    info = mmgrad.backends()["cuda"]
    if info.available:
        pytest.skip("this machine has the CUDA backend")
    with pytest.raises(ValueError, match="backend 'cuda' is unavailable: "):
        mmgrad.ops.gram(torch.randn(2, 5), backend="cuda")
    from mmgrad.kernels import cuda  # the module imports without the extension

    with pytest.raises(ValueError, match="g must be a CUDA tensor for backend='cuda'"):
        cuda.gram(torch.randn(2, 5))
    # the checks before any launch, on a GpuOps that accepts CPU tensors and launches nothing
    checks_only = GpuOps("cuda", lambda device: True, None, None, None)
    with pytest.raises(ValueError, match="the cuda backend.s MOO solver takes 1 <= M <= 16"):
        checks_only.moo_weights(torch.zeros(1, 17, 17, dtype=torch.float64), "mgda")
    with pytest.raises(ValueError, match='losses must be given when normalize="loss"'):
        checks_only.moo_weights(torch.zeros(1, 3, 3, dtype=torch.float64), "mgda", normalize="loss")
    with pytest.raises(TypeError, match="mean must be torch.float32 for backend='cuda'"):
        checks_only.bogc_step(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4), 1)
    with pytest.raises(RuntimeError, match="built only where torch has CUDA"):
        cuda._ext()


def test_auto_prefers_the_gpu_backend_whose_kernels_the_tests_execute(monkeypatch):
    """docs/spec.md §5: on CUDA tensors "auto" picks triton (its whole kernel logic runs under the
    interpreter here) before cuda (compiled and linked, never run); cuda when triton is out."""
    import importlib

    B = importlib.import_module("mmgrad.backends")  # the module (mmgrad.backends is also the function)

    def fake(available):
        infos = {n: B.BackendInfo(n, n in available, ("cuda",) if n in ("triton", "cuda") else ("cpu",), "")
                 for n in B.BACKENDS}
        return lambda: infos

    monkeypatch.setattr(B, "backends", fake({"reference", "triton", "cuda"}))
    assert B.resolve("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(B, "backends", fake({"reference", "cuda"}))
    assert B.resolve("auto", torch.device("cuda")) == "cuda"
    monkeypatch.setattr(B, "backends", fake({"reference"}))
    assert B.resolve("auto", torch.device("cuda")) == "reference"
