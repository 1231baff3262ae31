"""One rank of the multi-rank gloo tests (tests/test_distributed.py), or the single-process run.

    python tests/distributed_worker.py RANK WORLD STORE_FILE METHODS WRAP OUT_FILE [CKPT_DIR]

METHODS: one method or several, comma-separated; OUT_FILE holds {method: result} or {"error": ...}.

WRAP: "plain" (model not wrapped; the calibrator averages everything), "plain_batched" /
"ddp_batched" (backward_mode="batched"), "ddp_no_sync" (DDP-wrapped, forward and
backward under no_sync), "ddp" (DDP-wrapped without no_sync: must fail with the
calibrator's message); "shard" / "shard_batched" (shard=True, ZeRO-2), "fsdp"
(fully_shard per encoder and at the root); "plain_accum" / "shard_accum" / "fsdp_accum"
(two micro-batches per step, the first in cal.accumulate()); "plain_buckets" (a 64-byte
bucket: many all-reduces); "fsdp_refusals" (the DTensor parameters the calibrator refuses);
"shard_nan_skip" / "shard_nan_raise" (rank 1's batch poisoned at step NAN_STEP);
"shard_first" / "shard_resume" and "fsdp_first" / "fsdp_resume" (5 steps and a per-rank
checkpoint in CKPT_DIR, then 5 more in new processes); "shard_dcpfirst" / "shard_dcpresume"
and the fsdp pair: the same through torch.distributed.checkpoint, which may resume at
another world size.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed.checkpoint
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmgrad  # noqa: E402
from mmgrad.distributed import broadcast_parameters  # noqa: E402
from toy_model import TwoView, batch  # noqa: E402

STEPS, FULL_BATCH, NAN_STEP, SPLIT = 10, 16, 3, 5
# sharded setups split dim 0 over the ranks: 7 and 3 rows leave padded and (4 ranks) empty shards
SIZES = {"hidden": 7, "extra": 3}
OPTIONS = {"mmpareto": {"lagged": True}, "ogm": {"group_objectives": [1, 2, 1], "modulate": "all"}}


def build(method: str, rank: int, world: int, wrap: str):
    torch.manual_seed(rank)  # different inits on purpose: broadcast_parameters / DDP / FSDP2 must fix them
    model = TwoView(**SIZES)
    if world > 1:
        broadcast_parameters(model.parameters())
    net = model
    if wrap.startswith("ddp"):
        net = torch.nn.parallel.DistributedDataParallel(model)
    if wrap.startswith("fsdp") and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for part in (model.enc_a, model.enc_b, model.extra):
            fully_shard(part, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mode = "batched" if wrap.endswith("batched") else "loop"
    options = dict(OPTIONS.get(method, {}), backward_mode=mode, shard=wrap.startswith("shard"))
    if "nan" in wrap:
        options["skip_nonfinite"] = wrap.endswith("skip")
    if wrap.endswith("buckets"):
        options["bucket_bytes"] = 64
    cal = mmgrad.FusedCalibrator(model.groups(), 3, method=method, **options).attach(opt)
    return model, net, opt, cal


def train(method: str, rank: int, world: int, wrap: str, steps=range(STEPS), ckpt: str = "") -> dict:
    """SGD-momentum steps; rank r trains on its contiguous 1/world of each full batch."""
    model, net, opt, cal = build(method, rank, world, wrap)
    if wrap.endswith("dcpresume"):
        state = dcp_state(model, opt, cal)
        torch.distributed.checkpoint.load(state, checkpoint_id=os.path.join(ckpt, method))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    elif wrap.endswith("resume"):
        saved = torch.load(os.path.join(ckpt, f"{method}-rank{rank}.pt"), weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        cal.load_state_dict(saved["cal"])
    gen = torch.Generator().manual_seed(123)
    data = [batch(gen, FULL_BATCH) for _ in range(STEPS)]
    share = FULL_BATCH // world
    if "nan" in wrap:  # a sample of rank 1's share (of the full batch in one process)
        data[NAN_STEP][0][FULL_BATCH // 2, 0] = float("nan")
    errors = []
    for step in steps:
        mine = [t[rank * share:(rank + 1) * share] for t in data[step]]
        try:
            if wrap == "ddp_no_sync":
                with net.no_sync():
                    cal.backward(net(*mine))
            elif wrap.endswith("_accum"):  # two micro-batches, each half of the rank's share
                half = share // 2
                with cal.accumulate():
                    cal.backward([0.5 * loss for loss in net(*[t[:half] for t in mine])])
                cal.backward([0.5 * loss for loss in net(*[t[half:] for t in mine])])
            else:
                cal.backward(net(*mine))
            opt.step()
        except mmgrad.NonFiniteGradientError as err:
            errors.append(str(err))
        opt.zero_grad()
    if wrap.endswith("dcpfirst"):
        torch.distributed.checkpoint.save(dcp_state(model, opt, cal), checkpoint_id=os.path.join(ckpt, method))
    elif wrap.endswith("first"):
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "cal": cal.state_dict()},
                   os.path.join(ckpt, f"{method}-rank{rank}.pt"))
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in params], "errors": errors, "step_count": cal.step_count,
            "memory": cal.memory_bytes()}


def dcp_state(model, opt, cal) -> dict:
    """Model, optimizer and calibrator as DCP state: global tensors, any world size."""
    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state, "calibrator": mmgrad.CalibratorState(cal)}


def refusals(world: int) -> list:
    """What FusedCalibrator says to DTensor parameters it cannot take. (Not a 2-D mesh: its
    sub-groups' threads aborted a worker at exit, "terminate called without an active
    exception", in one CI run of three.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sharded = lambda *shape: torch.nn.Parameter(distribute_tensor(torch.zeros(*shape), mesh, [Shard(0)]))  # noqa: E731
    said = []
    for params, options in (
            ([sharded(4, 3), torch.nn.Parameter(torch.zeros(3))], {}),
            ([torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()]))], {}),
            ([sharded(4, 3)], {"backward_mode": "batched"}),
            ([sharded(4, 3)], {"process_group": torch.distributed.group.WORLD})):
        try:
            mmgrad.FusedCalibrator(params, 2, method="bogc", **options)
            said.append("accepted")
        except ValueError as err:
            said.append(str(err))
    return said


def main() -> None:
    rank, world, store, method, wrap, out = sys.argv[1:7]
    ckpt = sys.argv[7] if len(sys.argv) > 7 else ""
    rank, world = int(rank), int(world)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    steps = range(SPLIT) if wrap.endswith("first") else range(SPLIT, STEPS) if wrap.endswith("resume") else range(STEPS)
    results = {}
    try:
        if wrap == "fsdp_refusals":
            results = {"refusals": refusals(world)}
        for name in method.split(",") if wrap != "fsdp_refusals" else ():  # several methods: one start-up
            results[name] = train(name, rank, world, wrap, steps, ckpt)
    except RuntimeError as err:
        results = {"error": str(err)}
    finally:
        torch.save(results, out)
        torch.distributed.destroy_process_group()
    # The results are saved: leave without the interpreter's teardown, where gloo's
    # threads (the device mesh's sub-groups too) aborted workers at exit, "terminate
    # called without an active exception", after every result was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
