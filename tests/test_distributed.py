"""Several ranks (gloo, CPU) train like one process on the full batch: the all-reduce path
(plain model, DDP + no_sync), ZeRO-2 sharding (shard=True) and FSDP2; misuse fails clearly.

Each setup runs 10 SGD-momentum steps from different initial weights per rank (the
broadcast / FSDP2 must fix them) and must end within 1e-6 of one process on the full
batch. The sharded setups use layers of 7 and 3 rows, which leave padded and, on 4
ranks, empty shards.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from distributed_worker import SIZES, STEPS, train
from toy_model import TwoView

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")
ALL = ("bogc", "mgda", "mmpareto", "mimo")
GRAMIAN_BASELINES = ("upgrad", "dualproj", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "nash_mtl")


def run_ranks(tmp_path, methods, wrap: str, world: int = 2, ckpt: str = "") -> list:
    """Start `world` worker processes (each trains every method of `methods`); return what
    each saved: {method: result} or {"error": message}."""
    tag = f"{'-'.join(methods)}-{wrap}-{world}"
    store = tmp_path / f"store-{tag}"
    outs = [tmp_path / f"{tag}-{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), str(r), str(world),
                               str(store), ",".join(methods), wrap, str(o), *([ckpt] if ckpt else [])])
             for r, o in enumerate(outs)]
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0
    finally:  # one rank failing or hanging must not leave the others waiting on it
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(o, weights_only=False) for o in outs]


@functools.lru_cache(maxsize=None)
def one_process(method: str, wrap: str = "plain") -> tuple:
    return tuple(train(method, rank=0, world=1, wrap=wrap)["params"])


def assert_like_one_process(results, methods, wrap: str = "plain") -> None:
    for result in results:
        assert "error" not in result, result.get("error")
        for method in methods:
            got = result[method]
            assert got["step_count"] == STEPS and not got["errors"]
            for p, q in zip(one_process(method), got["params"]):
                assert torch.allclose(p, q, rtol=0, atol=1e-6), (method, (p - q).abs().max())


def test_the_single_process_run_moves_the_parameters():
    # else every comparison with it below would pass for a run that never stepped
    torch.manual_seed(0)
    initial = [p.detach() for p in TwoView(**SIZES).parameters()]
    for method in ALL:
        assert all((p - q).abs().max() > 1e-3 for p, q in zip(one_process(method), initial))


@pytest.mark.parametrize("methods, wrap", [(("bogc", "mgda"), "plain"), (("bogc", "mgda"), "ddp_no_sync"),
                                           (("bogc",), "plain_batched"), (("bogc", "mgda"), "plain_accum"),
                                           (("bogc", "mgda", "sum"), "plain_buckets")])
def test_all_reduce_path_equals_one_process(tmp_path, methods, wrap):
    assert_like_one_process(run_ranks(tmp_path, methods, wrap), methods)


@pytest.mark.parametrize("wrap, methods, world", [
    ("shard", (*ALL, "ogm", "sum", "mean"), 2), ("shard", ("bogc",), 4), ("shard_batched", ("bogc",), 2),
    ("shard_accum", ("bogc", "mgda"), 2), ("fsdp", (*ALL, "sum", "mean"), 2), ("fsdp", ("bogc", "ogm"), 4),
    ("fsdp_accum", ("bogc", "mgda"), 2), ("shard", GRAMIAN_BASELINES, 2), ("fsdp", GRAMIAN_BASELINES, 2)])
def test_sharded_rows_equal_one_process(tmp_path, wrap, methods, world):
    results = run_ranks(tmp_path, methods, wrap, world)
    assert_like_one_process(results, methods)
    for method in methods:  # each rank holds its slice: about 1/world of one process's rows and state
        single = train(method, rank=0, world=1, wrap="plain")["memory"]
        held = [r[method]["memory"] for r in results]
        for key in ("grad_buffer", "ema_state", "output"):
            assert sum(m[key] for m in held) == single[key], key  # every coordinate on exactly one rank
            assert max(m[key] for m in held) <= -(-single[key] // world) * 1.5, key


@pytest.mark.parametrize("method", ["bogc", "mgda"])
def test_a_nonfinite_gradient_on_one_rank_is_skipped_on_every_rank(tmp_path, method):
    results = run_ranks(tmp_path, [method], "shard_nan_skip")
    single = train(method, rank=0, world=1, wrap="shard_nan_skip")  # the poisoned sample in its full batch
    assert single["step_count"] == STEPS - 1
    for result in results:
        got = result[method]
        assert got["step_count"] == STEPS - 1 and not got["errors"]
        for p, q in zip(single["params"], got["params"]):
            assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_a_nonfinite_gradient_on_one_rank_raises_on_every_rank(tmp_path):
    for rank, result in enumerate(run_ranks(tmp_path, ["bogc"], "shard_nan_raise")):
        got = result["bogc"]
        assert len(got["errors"]) == 1 and "not finite" in got["errors"][0], rank
        assert got["step_count"] == STEPS - 1


@pytest.mark.parametrize("setup", ["shard", "fsdp"])
def test_sharded_state_resumes_in_new_processes(tmp_path, setup):
    # per-rank checkpoints after 5 steps; new processes load them and take the last 5
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for result in run_ranks(tmp_path, ["bogc", "mmpareto"], f"{setup}_first", ckpt=str(ckpt)):
        assert "error" not in result, result.get("error")
    resumed = run_ranks(tmp_path, ["bogc", "mmpareto"], f"{setup}_resume", ckpt=str(ckpt))
    for result in resumed:
        for method in ("bogc", "mmpareto"):
            for p, q in zip(one_process(method), result[method]["params"]):
                assert torch.allclose(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("setup", ["shard", "fsdp"])
def test_a_dcp_checkpoint_resumes_at_another_world_size(tmp_path, setup):
    """Saved through torch.distributed.checkpoint at world 2 (mmgrad.CalibratorState),
    resumed at worlds 4 and 1: each continues like one process from the same state."""
    methods = ["bogc", "mmpareto"]  # EMA state rows, and lagged weights
    ckpt = tmp_path / "dcp"
    ckpt.mkdir()
    for result in run_ranks(tmp_path, methods, f"{setup}_dcpfirst", world=2, ckpt=str(ckpt)):
        assert "error" not in result, result.get("error")
    for world in (4, 1):
        for result in run_ranks(tmp_path, methods, f"{setup}_dcpresume", world=world, ckpt=str(ckpt)):
            assert "error" not in result, result.get("error")
            for method in methods:
                assert result[method]["step_count"] == STEPS, (world, method)
                for p, q in zip(one_process(method), result[method]["params"]):
                    assert torch.allclose(p, q, rtol=0, atol=1e-6), (world, method, (p - q).abs().max())


def test_dtensor_parameters_it_cannot_take_are_refused_by_name(tmp_path):
    for result in run_ranks(tmp_path, ["bogc"], "fsdp_refusals"):
        mixed, replicated, batched, group = result["refusals"]
        assert "some are DTensors (fully_shard) and some plain tensors" in mixed
        assert "placed (Replicate(),)" in replicated
        assert batched.startswith("backward_mode: FSDP2")
        assert group.startswith("process_group: FSDP2")


def test_ddp_without_no_sync_fails_with_the_way_out(tmp_path):
    for result in run_ranks(tmp_path, ["bogc"], "ddp"):
        assert "no_sync" in result["error"] and "DistributedDataParallel" in result["error"]


def test_ddp_without_no_sync_in_batched_mode_fails_in_ddp_not_silently(tmp_path):
    # autograd.grad never reaches DDP's reducer; DDP itself refuses the next forward
    for result in run_ranks(tmp_path, ["bogc"], "ddp_batched"):
        assert "Expected to have finished reduction" in result["error"]
