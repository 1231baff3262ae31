"""Calibrator memory per rank and bytes communicated per step, by distributed setup.

The model and batch of ``mmgrad.tools.bench_step`` (LateFusion on the six UCI views, ~10 M
parameters, M = 7, every encoder calibrated), trained for a few AdamW steps by 1, 2 and 4
gloo ranks on this machine's CPU, each rank on 1/world of the batch, in three setups:

* ``all-reduce``: the plain model; the calibrator all-reduces its rows (``shard=False``);
* ``shard``: the plain model; rows reduce-scattered, outputs all-gathered (``shard=True``);
* ``fsdp2``: every encoder and the root ``fully_shard``-ed; FSDP2 reduce-scatters;
* ``fsdp2-keep``: the same with ``reshard_after_forward=False``, so the M backward passes
  reuse the forward's gathered parameters instead of gathering them again each.

Per rank it reports what the calibrator holds (``memory_bytes()``: rows, EMA state,
output; ``shard=True`` also holds the gathered ``.grad``, listed apart because plain
training holds a ``.grad`` too) and the bytes each collective carried per step, counted
by wrapping ``torch.distributed``'s collectives (the input size of each, and the bytes
a ring algorithm sends per rank: ``2 (w-1)/w`` of an all-reduce, ``(w-1)/w`` of a
reduce-scatter's input or an all-gather's output). Plain DDP's volume is computed: it
all-reduces every gradient once. The ranks share this machine's two cores, so no time is
reported: it would measure the contention, not the method.

``python -m mmgrad.tools.bench_dist [--worlds 1 2 4] [--methods bogc mgda] [--hidden 2048]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any, Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import describe

SETUPS = ("all-reduce", "shard", "fsdp2", "fsdp2-keep")
_COLLECTIVES = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single",
                "all_gather_into_tensor")


class ByteCounter:
    """Wraps ``torch.distributed``'s collectives (looked up per call by mmgrad and FSDP2)
    and adds up, per kind, the input bytes and the bytes a ring algorithm sends per rank."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.volume: Dict[str, int] = {}
        self.sent = 0.0
        self._saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            named = [kwargs.get(k) for k in ("output", "output_tensor", "tensor", "input", "input_tensor")]
            out = args[0] if args else next(t for t in named[:3] if t is not None)
            inp = args[1] if len(args) > 1 else next((t for t in named[3:] if t is not None), None)
            nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
            share = (self.world - 1) / self.world
            if name == "all_reduce":
                size, wire = nbytes(out), 2 * share * nbytes(out)
            elif name.startswith("reduce_scatter"):
                size, wire = nbytes(inp), share * nbytes(inp)
            else:  # all-gather: the gathered output
                size, wire = nbytes(out), share * nbytes(out)
            kind = name.split("_single")[0].split("_tensor")[0].split("_into")[0]
            self.volume[kind] = self.volume.get(kind, 0) + size
            self.sent += wire
            return fn(*args, **kwargs)
        return counted

    def reset(self) -> None:
        self.volume, self.sent = {}, 0.0

    def restore(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _rank(rank: int, world: int, store: str, methods: Sequence[str], hidden: int, steps: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..calibrator import FusedCalibrator
    from ..distributed import broadcast_parameters
    from .bench_step import make_batch, make_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counter = ByteCounter(world)
    results: List[Dict[str, Any]] = []
    x, y = make_batch(256)
    share = 256 // world
    x = {v: t[rank * share:(rank + 1) * share] for v, t in x.items()}
    y = y[rank * share:(rank + 1) * share]
    try:
        for setup in SETUPS:
            for method in methods:
                model = make_model(hidden=hidden, embed=hidden * 11 // 32)
                if setup.startswith("fsdp2"):
                    mesh = init_device_mesh("cpu", (world,))
                    keep = setup.endswith("keep")
                    for enc in model.encoders.values():
                        fully_shard(enc, mesh=mesh, reshard_after_forward=not keep)
                    fully_shard(model, mesh=mesh, reshard_after_forward=not keep)
                elif world > 1:
                    broadcast_parameters(model.parameters())
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                cal = FusedCalibrator(model.param_groups(), 1 + len(model.views), method=method,
                                      shard=setup == "shard").attach(opt)
                for step in range(steps):
                    if step == 1:  # the first step lays out the reach; count the steady ones
                        counter.reset()
                    cal.backward(model.losses(x, y))
                    opt.step()
                    opt.zero_grad()
                calibrated = sum(p.numel() for p in cal.params)
                results.append({"setup": setup, "method": method, "memory": cal.memory_bytes(),
                                "volume": {k: v / (steps - 1) for k, v in counter.volume.items()},
                                "sent": counter.sent / (steps - 1), "calibrated": calibrated,
                                "params": sum(p.numel() for p in model.parameters())})
                del cal, opt, model
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        counter.restore()
        dist.destroy_process_group()


def measure(world: int, methods: Sequence[str], hidden: int, steps: int = 3) -> List[Dict[str, Any]]:
    """Rank 0's figures for every setup and method, from ``world`` spawned ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), list(methods), hidden, steps, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def held(memory: Dict[str, int]) -> int:
    """The calibrator's own bytes (the gathered ``.grad`` is what plain training holds too)."""
    return memory["grad_buffer"] + memory["ema_state"] + memory["output"]


def report(by_world: Dict[int, List[Dict[str, Any]]]) -> str:
    mib = 1024 ** 2
    lines = ["calibrator memory per rank (rows + EMA state + output; MiB) and its share of world 1's",
             f"{'setup':<12} {'method':<9}" + "".join(f"{'world ' + str(w):>18}" for w in by_world)]
    first = min(by_world)
    base = {(r["setup"], r["method"]): held(r["memory"]) for r in by_world[first]}
    keys = [(r["setup"], r["method"]) for r in by_world[first]]
    for key in keys:
        cells = []
        for w, rows in by_world.items():
            r = next(r for r in rows if (r["setup"], r["method"]) == key)
            cells.append(f"{held(r['memory']) / mib:9.1f} ({held(r['memory']) / base[key]:4.0%})")
        lines.append(f"{key[0]:<12} {key[1]:<9}" + "".join(f"{c:>18}" for c in cells))
    lines += ["", "bytes per step per rank: collective inputs by kind (MiB), and what a ring algorithm sends",
              f"{'world':<6} {'setup':<12} {'method':<9} {'all_reduce':>11} {'reduce_sc.':>11} {'all_gather':>11} "
              f"{'ring sent':>10} {'/ DDP':>7}"]
    for w, rows in by_world.items():
        if w == 1:
            continue
        ddp_sent = 2 * (w - 1) / w * rows[0]["params"] * 4  # DDP all-reduces every float32 gradient once
        lines.append(f"{w:<6} {'plain DDP':<12} {'(sum)':<9} {rows[0]['params'] * 4 / mib:11.1f} {0:11.1f} {0:11.1f} "
                     f"{ddp_sent / mib:10.1f} {1:7.2f}")
        for r in rows:
            v = r["volume"]
            lines.append(f"{w:<6} {r['setup']:<12} {r['method']:<9} {v.get('all_reduce', 0) / mib:11.1f} "
                         f"{v.get('reduce_scatter', 0) / mib:11.1f} {v.get('all_gather', 0) / mib:11.1f} "
                         f"{r['sent'] / mib:10.1f} {r['sent'] / ddp_sent:7.2f}")
    lines.append("(the fsdp2 rows include FSDP2's own parameter all-gathers: in forward, and again in each of "
                 "the M backward passes unless reshard_after_forward=False, fsdp2-keep)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmgrad.tools.bench_dist", description=describe(__doc__))
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--methods", nargs="+", default=["bogc", "mgda"])
    ap.add_argument("--hidden", type=int, default=2048, help="encoder width (2048: ~10 M parameters)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    by_world = {w: measure(w, args.methods, args.hidden, args.steps) for w in args.worlds}
    print(f"{by_world[args.worlds[0]][0]['params'] / 1e6:.1f} M parameters, "
          f"{by_world[args.worlds[0]][0]['calibrated'] / 1e6:.1f} M calibrated, M = 7")
    print(report(by_world))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
