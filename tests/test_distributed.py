"""2 ranks (gloo, CPU) train like one process on the full batch; DDP misuse fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distributed_worker import train
from toy_model import TwoView

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def run_ranks(tmp_path, method: str, wrap: str, world: int = 2) -> list:
    """Start `world` worker processes; return what each saved (params or an error)."""
    store = tmp_path / f"store-{method}-{wrap}"
    outs = [tmp_path / f"{method}-{wrap}-{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), str(r), str(world), str(store), method, wrap, str(o)])
             for r, o in enumerate(outs)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("method, wrap", [("bogc", "plain"), ("mgda", "plain"), ("bogc", "ddp_no_sync"),
                                          ("mgda", "ddp_no_sync"), ("bogc", "plain_batched")])
def test_two_ranks_equal_one_process_on_the_full_batch(tmp_path, method, wrap):
    single = train(method, rank=0, world=1, wrap="plain")
    for result in run_ranks(tmp_path, method, wrap):
        assert "error" not in result, result.get("error")
        for p, q in zip(single, result["params"]):
            assert torch.allclose(p, q, rtol=0, atol=1e-6), (p - q).abs().max()
    # the parameters moved (a run that never stepped would pass the comparison above)
    torch.manual_seed(0)
    initial = [p.detach() for p in TwoView().parameters()]
    assert all((p - q).abs().max() > 1e-3 for p, q in zip(single, initial))


def test_ddp_without_no_sync_fails_with_the_way_out(tmp_path):
    for result in run_ranks(tmp_path, "bogc", "ddp"):
        assert "no_sync" in result["error"] and "DistributedDataParallel" in result["error"]


def test_ddp_without_no_sync_in_batched_mode_fails_in_ddp_not_silently(tmp_path):
    # autograd.grad never reaches DDP's reducer; DDP itself refuses the next forward
    for result in run_ranks(tmp_path, "bogc", "ddp_batched"):
        assert "Expected to have finished reduction" in result["error"]
