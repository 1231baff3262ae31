"""The GPU backends on CUDA tensors, against the float64 reference: what the interpreter
tests check on CPU tensors, checked where the kernels really run. Skipped without a CUDA
device. ``make device-check`` runs this module in a process of its own, so that no test
module that sets ``TRITON_INTERPRET=1`` for the interpreter tests has imported Triton
first (``pytest -m gpu tests/test_gpu.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

import mmgrad
from mmgrad import ops
from mmgrad import reference as R
from mmgrad.tools.verify import (ILL_CONDITIONED_KINDS, TOLERANCE, compare_all, dual_cone_errors, duality_gap,
                                 ill_conditioned_gram, random_case)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
GPU_BACKENDS = ("triton", "cuda")


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    info = mmgrad.backends()[request.param]
    if not info.available:
        pytest.skip(f"{request.param}: {info.reason}")
    return request.param


def on_cuda(case):
    import dataclasses

    moved = {f.name: getattr(case, f.name).cuda() for f in dataclasses.fields(case)
             if isinstance(getattr(case, f.name), torch.Tensor) and f.name != "group_offsets"}
    return dataclasses.replace(case, **moved)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("m,n", ((1, 1), (2, 7), (3, 1025), (8, 70001), (4, (1 << 20) + 3)))
def test_every_function_matches_the_reference_on_cuda(gen, backend, dtype, m, n):
    errors = compare_all(backend, on_cuda(random_case(m, n, dtype, gen)))
    bad = {fn: e for fn, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, f"{backend} {dtype} M={m} N={n}: {bad} above {TOLERANCE[dtype]}"


@pytest.mark.parametrize("m", (3, 8, 16))
def test_the_device_solver_meets_the_certificate_on_cuda(gen, backend, m):
    seeds = torch.randint(0, 2**31, (len(ILL_CONDITIONED_KINDS),), generator=gen).tolist()
    k = torch.stack([ill_conditioned_gram(s, m, kind) for s, kind in zip(seeds, ILL_CONDITIONED_KINDS)])
    w = ops.moo_weights(k.cuda(), "mgda", backend=backend).cpu()
    for kk, a, kind in zip(k, w, ILL_CONDITIONED_KINDS):
        assert duality_gap(kk, a) <= R.moo.MGDA_GAP_TOL * float(kk.diagonal().max()), kind
        assert math.isclose(float(a.sum()), 1.0, rel_tol=1e-12) and bool((a >= 0).all())


@pytest.mark.parametrize("m", (3, 8, 16))
def test_the_dual_cone_solver_is_the_hosts_on_cuda(gen, m):
    """UPGrad's and DualProj's projections on the device: every kind, to 1e-8 of the host's."""
    if not mmgrad.backends()["triton"].available:
        pytest.skip(mmgrad.backends()["triton"].reason)
    seeds = torch.randint(0, 2**31, (len(ILL_CONDITIONED_KINDS),), generator=gen).tolist()
    k = torch.stack([ill_conditioned_gram(s, m, kind) for s, kind in zip(seeds, ILL_CONDITIONED_KINDS)])
    pref = (torch.rand(m, generator=gen, dtype=torch.float64) + 0.1).tolist()
    for method in ("dualproj", "upgrad"):
        w = ops.moo_weights(k.cuda(), method, backend="triton", pref_vector=pref).cpu()
        host = R.dual_cone_weights(k, method, pref_vector=pref)
        for kk, a, b, kind in zip(k, w, host, ILL_CONDITIONED_KINDS):
            assert dual_cone_errors(kk, torch.tensor(pref, dtype=torch.float64), a, b)["distance"] <= 1e-8, (method, kind)


@pytest.mark.parametrize("method", ("bogc", "mgda", "mmpareto", "mimo", "ogm", "sum", "mean", "upgrad"))
@pytest.mark.parametrize("sync_free", (False, True))
def test_calibrated_training_on_cuda_matches_the_reference_on_cpu(backend, method, sync_free):
    """Five SGD steps of a two-encoder model: the GPU backend on CUDA against the reference
    backend on CPU, same data, same start."""
    if sync_free and backend != "triton":
        pytest.skip("sync_free=True runs on the triton backend")
    finals = []
    for device, b in (("cpu", "reference"), ("cuda", backend)):
        torch.manual_seed(0)
        enc_a, enc_b, head = torch.nn.Linear(6, 8), torch.nn.Linear(5, 8), torch.nn.Linear(16, 3)
        params = [p.to(device) for p in (*enc_a.parameters(), *enc_b.parameters(), *head.parameters())]
        params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        wa, ba, wb, bb, wh, bh = params
        # the sync-free step needs a fused optimizer; the reference run takes the same Adam unfused
        opt = torch.optim.Adam(params, lr=1e-2, fused=device == "cuda") if sync_free else torch.optim.SGD(
            params, lr=0.1, momentum=0.9)
        kw = {"sync_free": True, "skip_nonfinite": True} if sync_free and device == "cuda" else {}
        if method == "ogm":  # linear encoders: every tensor modulated, so the noise is exercised
            kw["modulate"] = "all"
        cal = mmgrad.FusedCalibrator([{"params": [wa, ba]}, {"params": [wb, bb]}], 3, method=method, backend=b,
                                     **kw).attach(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            xa, xb = torch.randn(32, 6, generator=gen).to(device), torch.randn(32, 5, generator=gen).to(device)
            y = torch.randint(0, 3, (32,), generator=gen).to(device)
            za, zb = torch.tanh(xa @ wa.T + ba), torch.tanh(xb @ wb.T + bb)
            ce = torch.nn.functional.cross_entropy
            logits = torch.cat([za, zb], 1) @ wh.T + bh
            cal.backward([ce(logits, y), ce(za @ wh[:, :8].T + bh, y), ce(zb @ wh[:, 8:].T + bh, y)])
            opt.step()
            opt.zero_grad()
        finals.append(torch.cat([p.detach().cpu().reshape(-1) for p in params]))
        cal.detach()
    err = float((finals[0] - finals[1]).abs().max() / finals[0].abs().max())
    assert err <= 1e-4, f"{method} on {backend} (sync_free={sync_free}): parameters {err:.2e} from the reference"


@pytest.mark.parametrize("name", ("triton_bogc", "triton_bogc_in_place", "triton_combine", "triton_moo_weights",
                                  "triton_dual_cone"))
def test_opcheck_passes_for_the_triton_operators_on_cuda(gen, name):
    """On a GPU they are ``triton_op``s (torch.compile sees their kernels): schema, fakes,
    autograd registration and AOT dispatch, with the kernels really launched."""
    if not mmgrad.backends()["triton"].available:
        pytest.skip(mmgrad.backends()["triton"].reason)
    from test_library import _triton_args

    op = getattr(torch.ops.mmgrad, name.removesuffix("_in_place")).default
    result = torch.library.opcheck(op, _triton_args(name, gen))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("method", ("bogc", "mgda"))
def test_a_compiled_training_step_on_triton_matches_eager(method):
    """torch.compile over a whole step (losses, calibration on the triton backend, AdamW):
    the same parameters as eager, within 1e-5."""
    if not mmgrad.backends()["triton"].available:
        pytest.skip(mmgrad.backends()["triton"].reason)
    from test_library import _train

    torch._dynamo.reset()
    finals = [_train(method, compiled, backend="triton", device="cuda")[0] for compiled in (False, True)]
    assert float((finals[1] - finals[0]).abs().max()) <= 1e-5 * float(finals[0].abs().max())


@pytest.mark.parametrize("name", ("cuda_bogc", "cuda_combine", "cuda_moo_weights"))
def test_opcheck_passes_for_the_cuda_operators(gen, name):
    """The CUDA extension's launches as torch.library operators (opaque, with fakes)."""
    if not mmgrad.backends()["cuda"].available:
        pytest.skip(mmgrad.backends()["cuda"].reason)
    import mmgrad.kernels.cuda  # noqa: F401  (registers them)

    m, n = 3, 1537
    g = torch.randn(m, n, generator=gen).cuda()
    off = torch.tensor([0, 700, n])
    if name == "cuda_bogc":
        mean, var = torch.randn(m, n, generator=gen).cuda(), torch.rand(m, n, generator=gen).cuda()
        args = (g, mean, var, torch.empty_like(mean), torch.empty_like(var), torch.empty(n, device="cuda"), off, 0,
                0.3, 0.7, 1.0, 1e-8, 0, 0)
    elif name == "cuda_combine":
        args = (g, torch.rand(2, m, generator=gen, dtype=torch.float64).cuda(), torch.empty(n, device="cuda"), off, True)
    else:
        a = torch.randn(2, m, 2 * m, generator=gen, dtype=torch.float64).cuda()
        args = (a @ a.transpose(1, 2), 0, 0, torch.ones(m, dtype=torch.float64, device="cuda"), 1.5)
    result = torch.library.opcheck(getattr(torch.ops.mmgrad, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
