"""Sharding in one process: the layout of a rank's slice, FSDP2 on a one-rank mesh, and
every error a user can hit (the multi-rank runs are in tests/test_distributed.py)."""

from __future__ import annotations

import os

import pytest
import torch

import mmgrad
from mmgrad.collect import GRADS, GradientCollector
from mmgrad.layout import Layout, dim0_rows, shard_shape
from toy_model import TwoView, batch

dist = torch.distributed


@pytest.mark.parametrize("d0, world", [(7, 2), (7, 4), (3, 4), (1, 2), (8, 8), (5, 1)])
def test_dim0_rows_split_like_fsdp2(d0, world):
    rows = [dim0_rows((d0, 3), r, world) for r in range(world)]
    chunks = torch.arange(d0 * 3).view(d0, 3).chunk(world)  # FSDP2 shards with torch.chunk, padding empty ranks
    for r, (start, stop) in enumerate(rows):
        want = chunks[r].shape[0] if r < len(chunks) else 0
        assert stop - start == want and shard_shape((d0, 3), (start, stop)) == (want, 3)
    assert rows[0][0] == 0 and rows[-1][1] == d0 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert dim0_rows((), 0, world) == (0, 1) and dim0_rows((), world - 1, world) == ((0, 1) if world == 1 else (1, 1))


def test_a_sharded_layout_holds_its_slice_of_every_row():
    model = TwoView(hidden=7, extra=3)
    groups = [list(g["params"]) for g in model.groups()]
    params = [p for g in groups for p in g]
    for world in (2, 4):
        held = 0
        for rank in range(world):
            lay = Layout(groups, 3, shards=[dim0_rows(p.shape, rank, world) for p in params])
            lay.extend([{0, 1}] * 2 + [{0, 2}] * 2 + [{0}] * 2)
            lay.add_buffer(GRADS, torch.float32)
            assert lay.total_elements == sum(p.numel() for p in params)
            assert [tuple(v.shape) for v in lay.out_views] == [tuple(s) for s in lay.shapes]
            held += lay.rows_held()
            for seg in lay.segments:  # views of the rows have the local shapes, also when empty
                assert [tuple(v.shape) for v in seg.param_views(GRADS, 0)] == [tuple(s) for s in seg.shapes]
        unsharded = Layout(groups, 3)
        unsharded.extend([{0, 1}] * 2 + [{0, 2}] * 2 + [{0}] * 2)
        assert held == unsharded.rows_held()  # every (row, coordinate) on exactly one rank


def test_shard_must_be_a_bool():
    model = TwoView()
    with pytest.raises(TypeError, match="shard must be a bool"):
        mmgrad.FusedCalibrator(model.groups(), 3, shard=1)


def test_shard_in_one_process_is_the_unsharded_calibrator():
    runs = []
    for shard in (False, True):
        torch.manual_seed(0)
        model = TwoView()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cal = mmgrad.FusedCalibrator(model.groups(), 3, shard=shard).attach(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            cal.backward(model(*batch(gen)))
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_sharded_state_does_not_load_unsharded():
    model = TwoView()
    cal = mmgrad.FusedCalibrator(model.groups(), 3)
    cal.backward(model(*batch(torch.Generator().manual_seed(0))))
    cal.step()
    state = cal.state_dict()
    assert state["shard"] is None
    state["shard"] = {"rank": 1, "world": 2}
    with pytest.raises(ValueError, match="state shard: the state was saved rank 1 of 2, this calibrator is unsharded"):
        cal.load_state_dict(state)


class _Sharder:  # stands in for RowSharder: what the collector hands it
    def __init__(self):
        self.calls = []

    def scatter(self, layout, objective, sample, grads):
        self.calls.append((objective, [g is not None for g in grads]))

    def wait(self, keep_last=False):
        pass


def test_a_stray_gradient_under_shard_raises_instead_of_being_dropped():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    lay = Layout([[*a.parameters()], [*b.parameters()]], 2)
    lay.extend([{0}, {0}, {1}, {1}])
    collector = GradientCollector(lay, "loop", sharder=_Sharder())
    collector.ensure_buffer(1)
    x = torch.randn(3, 2)
    # a hook on objective 0's graph writes into b (which only objective 1 reaches)
    h = a(x)
    h.register_hook(lambda g: setattr(b.weight, "grad", torch.ones_like(b.weight)))
    losses = [h.sum(), b(x).sum()]
    with pytest.raises(RuntimeError, match="shard=True every rank must reduce-scatter the same rows"):
        collector.collect(losses, 1, accumulate=False, others=[], reduce=False)
    collector.sharder.calls.clear()
    lay.zero_(GRADS)
    collector.collect([a(x).sum(), b(x).sum()], 1, accumulate=False, others=[], reduce=False)
    assert collector.sharder.calls == [(0, [True, True, False, False]), (1, [False, False, True, True])]


# --------------------------------------------------------------- FSDP2, one rank
@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp_model(**sizes):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TwoView(**sizes)
    mesh = init_device_mesh("cpu", (1,))
    for part in (model.enc_a, model.enc_b, model.extra):
        fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_fsdp2_parameters_train_like_the_plain_model(one_rank_group):
    from torch.distributed.tensor import DTensor

    runs = []
    for fsdp in (False, True):
        if fsdp:
            model = _fsdp_model()
        else:
            torch.manual_seed(0)
            model = TwoView()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cal = mmgrad.FusedCalibrator(model.groups(), 3, method="bogc").attach(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            cal.backward(model(*batch(gen)))
            cal.step()
            if fsdp:  # what the optimizer sees: sharded DTensor gradients
                assert all(isinstance(p.grad, DTensor) for p in cal.params)
            opt.step()
            opt.zero_grad()
        runs.append([(p.full_tensor() if fsdp else p).detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_fsdp2_misuse_fails_clearly(one_rank_group):
    model = _fsdp_model()
    with pytest.raises(ValueError, match="backward_mode='batched'"):
        mmgrad.FusedCalibrator(model.groups(), 3, backward_mode="batched")
    with pytest.raises(ValueError, match="process_group: FSDP2 parameters are averaged by FSDP2"):
        mmgrad.FusedCalibrator(model.groups(), 3, process_group=dist.group.WORLD)
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="some are DTensors"):
        mmgrad.FusedCalibrator([*model.enc_a.parameters(), *plain.parameters()], 3)
