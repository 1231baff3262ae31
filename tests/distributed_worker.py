"""One rank of the 2-rank gloo test (tests/test_distributed.py), or the single-process run.

    python tests/distributed_worker.py RANK WORLD STORE_FILE METHOD WRAP OUT_FILE

WRAP: "plain" (model not wrapped; the calibrator averages everything), "plain_batched" /
"ddp_batched" (backward_mode="batched"),
"ddp_no_sync" (DDP-wrapped, forward and backward under no_sync), "ddp" (DDP-wrapped
without no_sync: must fail with the calibrator's message).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmgrad  # noqa: E402
from mmgrad.distributed import broadcast_parameters  # noqa: E402
from toy_model import TwoView, batch  # noqa: E402

STEPS, FULL_BATCH = 10, 16


def train(method: str, rank: int, world: int, wrap: str) -> list:
    """10 SGD-momentum steps; rank r trains on its contiguous 1/world of each full batch."""
    torch.manual_seed(rank)  # different inits on purpose: broadcast_parameters / DDP must fix them
    model = TwoView()
    if world > 1:
        broadcast_parameters(model.parameters())
    net = torch.nn.parallel.DistributedDataParallel(model) if wrap.startswith("ddp") else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mode = "batched" if wrap.endswith("batched") else "loop"
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, backward_mode=mode).attach(opt)
    gen = torch.Generator().manual_seed(123)
    share = FULL_BATCH // world
    for _ in range(STEPS):
        full = batch(gen, FULL_BATCH)
        mine = [t[rank * share:(rank + 1) * share] for t in full]
        if wrap == "ddp_no_sync":
            with net.no_sync():
                cal.backward(net(*mine))
        else:
            cal.backward(net(*mine))
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def main() -> None:
    rank, world, store, method, wrap, out = sys.argv[1:7]
    rank, world = int(rank), int(world)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        params = train(method, rank, world, wrap)
        torch.save({"params": params}, out)
    except RuntimeError as err:
        torch.save({"error": str(err)}, out)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
