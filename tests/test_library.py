"""mmgrad's kernels as torch.library operators: ``opcheck`` on every operator (schema,
fake tensors, autograd registration, AOT dispatch), the operators equal to the extension
they wrap, and a ``torch.compile``d training step, calibration and optimizer included,
equal to eager."""

from __future__ import annotations

import collections
import os

import pytest
import torch

import mmgrad
from mmgrad.backends import cpu_extension
from mmgrad.kernels import library

from conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels
N, M = 1537, 3  # N spans chunks of 512 and is no multiple of one; two groups


def sample_args(name: str, gen: torch.Generator, dtype: torch.dtype) -> tuple:
    """Fresh inputs for operator ``name``; its outputs allocated, unaliased."""
    g = torch.randn(M, N, generator=gen).to(dtype)
    off = torch.tensor([0, 700, N])
    state = torch.float32
    mean, var = torch.randn(M, N, generator=gen), torch.rand(M, N, generator=gen)
    opts = (1.0, 1e-8, 0, 0)
    if name == "bogc_step":
        return (g, mean, var, torch.empty(M, N, dtype=state), torch.empty(M, N, dtype=state), torch.empty(N),
                off, 4, 0.9, *opts)
    if name == "bogc_sample_step":
        return (torch.randn(4, M, N, generator=gen).to(dtype), torch.empty(N), off, *opts)
    if name == "bogc_from_moments":
        return (mean, var, *(torch.empty(N) for _ in range(4)), *opts)
    if name == "ema_moments":
        return (g.float(), mean, var, torch.empty(M, N), torch.empty(M, N), 4, 0.9)
    if name == "opinions":
        return (mean, var, *(torch.empty(M, N) for _ in range(4)), 1.0, 1e-8)
    if name == "ds_combine":
        b = torch.rand(3, M, N, generator=gen) / 2
        return (b[0], b[1], 1 - b[0] - b[1], *(torch.empty(N) for _ in range(3)))
    if name == "gram":
        return (g, off)
    assert name == "combine"
    return (g, torch.rand(2, M, generator=gen, dtype=torch.float64), off, torch.empty(N, dtype=dtype), True)


OPS = sorted(library.SCHEMAS)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("name", OPS)
def test_opcheck_passes_for_every_operator(gen, name, dtype):
    op = getattr(torch.ops.mmgrad, name).default
    result = torch.library.opcheck(op, sample_args(name, gen, dtype))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("name", OPS)
def test_each_operator_equals_the_extension_function_it_wraps(gen, name):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    ours = sample_args(name, torch.Generator().manual_seed(seed), torch.float32)
    theirs = sample_args(name, torch.Generator().manual_seed(seed), torch.float32)
    got = getattr(torch.ops.mmgrad, name)(*ours)
    want = getattr(cpu_extension(), name)(*library.extension_args(name, theirs))
    if got is not None:
        assert torch.equal(got, want)
    for a, b in zip(ours, theirs):  # the outputs it wrote, bit for bit
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def _train(method: str, compiled: bool, backend: str = "cpu", device: str = "cpu") -> tuple:
    """Four AdamW steps of a two-encoder model, calibrated on ``backend``, eager or under
    torch.compile; the trained parameters and (compiled) the graph breaks' reasons."""
    torch.manual_seed(0)
    enc_a, enc_b, head = (torch.nn.Linear(6, 8).to(device), torch.nn.Linear(5, 8).to(device),
                          torch.nn.Linear(16, 3).to(device))
    params = [*enc_a.parameters(), *enc_b.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    cal = mmgrad.FusedCalibrator([{"params": enc_a.parameters()}, {"params": enc_b.parameters()}], 3,
                                 method=method, backend=backend).attach(opt)
    ce = torch.nn.functional.cross_entropy

    def step(xa, xb, y):
        za, zb = enc_a(xa), enc_b(xb)
        cal.backward([ce(head(torch.cat([za, zb], 1)), y), ce(head(torch.cat([za, za], 1)), y),
                      ce(head(torch.cat([zb, zb], 1)), y)])
        opt.step()
        opt.zero_grad()

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 6, generator=gen).to(device), torch.randn(32, 5, generator=gen).to(device),
                torch.randint(0, 3, (32,), generator=gen).to(device)) for _ in range(4)]
    run = torch.compile(step) if compiled else step
    for batch in batches:
        run(*batch)
    trained = torch.cat([p.detach().reshape(-1) for p in params])
    breaks = collections.Counter()
    if compiled:  # explain() runs the step once more: after the parameters are read
        for b in torch._dynamo.explain(step)(*batches[0]).break_reasons:
            breaks[b.reason.splitlines()[0]] += 1
    cal.detach()
    return trained, breaks


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if mmgrad.backends()[b].available])
@pytest.mark.parametrize("method", ("bogc", "mgda"))
def test_a_compiled_training_step_matches_eager(method, backend):
    """The graph still breaks where the calibrator reads a value on the host (loss and
    gradient finiteness, .item()) and around each objective's backward(); never at a kernel
    (on triton under the interpreter the operators are opaque; tests/test_gpu.py compiles
    through the kernels)."""
    torch._dynamo.reset()
    eager, _ = _train(method, compiled=False, backend=backend)
    compiled, breaks = _train(method, compiled=True, backend=backend)
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())
    assert not [r for r in breaks if "mmgrad" in r or "pybind" in r or "builtin" in r], breaks


# ---------------------------------------------------------------- the Triton operators
def _triton_args(name: str, gen: torch.Generator) -> tuple:
    """Fresh inputs for the Triton operator ``name`` on the device the backend runs on
    here (CPU tensors under the interpreter); outputs allocated, unaliased."""
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    g = torch.randn(M, N, generator=gen).to(device)
    bounds = [0, 700, N]
    if name.startswith("triton_bogc"):  # "triton_bogc_in_place": the sync-free step's gated one-slot update
        mean, var = torch.randn(M, N, generator=gen).to(device), torch.rand(M, N, generator=gen).to(device)
        alpha = torch.tensor([0.3, 0.7], dtype=torch.float64, device=device)
        if name.endswith("in_place"):
            commit = torch.ones((), dtype=torch.int64, device=device)
            return (g, mean, var, torch.empty(0, device=device), torch.empty(0, device=device),
                    torch.empty(N, device=device), bounds, 0, alpha, commit, 1.0, 1e-8, 0, 0, True)
        return (g, mean, var, torch.empty_like(mean), torch.empty_like(var), torch.empty(N, device=device), bounds,
                0, alpha, None, 1.0, 1e-8, 0, 0, False)
    if name == "triton_combine":
        alpha = torch.rand(2, M, generator=gen, dtype=torch.float64).to(device)
        return (g, alpha, torch.empty(N, device=device), bounds, True)
    a = torch.randn(2, M, 2 * M, generator=gen, dtype=torch.float64).to(device)
    if name == "triton_dual_cone":  # one projection per group (DualProj's), float64 epsilons on the device
        prefs = torch.rand(1, M, generator=gen, dtype=torch.float64).to(device)
        return (a @ a.transpose(1, 2), prefs, torch.tensor([1e-4, 1e-4, 1e-15], dtype=torch.float64, device=device))
    assert name == "triton_moo_weights"
    return (a @ a.transpose(1, 2), 0, 0, torch.ones(M, dtype=torch.float64, device=device), 1.5)


TRITON_OPS = ("triton_bogc", "triton_bogc_in_place", "triton_combine", "triton_moo_weights", "triton_dual_cone")


@pytest.mark.skipif(not mmgrad.backends()["triton"].available, reason="triton does not run here")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_opcheck_passes_for_every_triton_operator(gen, name):
    """The Triton launches are ``triton_op``s: schema, fake tensors, autograd registration
    and AOT dispatch checked, as for the CPU operators (under the interpreter here)."""
    import mmgrad.kernels.triton_kernels  # noqa: F401  (registers them)

    op = getattr(torch.ops.mmgrad, name.removesuffix("_in_place")).default
    result = torch.library.opcheck(op, _triton_args(name, gen))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.skipif(not mmgrad.backends()["triton"].available, reason="triton does not run here")
def test_the_triton_operators_compute_what_the_backend_returns(gen):
    """The operator's partials summed are the backend's Gram (the backend calls it)."""
    import mmgrad.kernels.triton_kernels  # noqa: F401

    g, alpha, out, bounds, _ = _triton_args("triton_combine", gen)
    parts = torch.ops.mmgrad.triton_combine(g, alpha, out, bounds, True)
    gram = parts.sum(1)[:, :-1].reshape(2, M, M)
    want = mmgrad.reference.gram(g.double().cpu(), group_offsets=torch.tensor(bounds))
    assert float((gram.cpu() - want).abs().max()) <= 1e-9 * float(want.abs().max())
    combined = mmgrad.reference.combine(g.double().cpu(), alpha.cpu(), group_offsets=torch.tensor(bounds))
    assert float((out.double().cpu() - combined).abs().max()) <= 1e-5 * float(combined.abs().max())
