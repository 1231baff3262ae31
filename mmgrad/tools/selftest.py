"""``python -m mmgrad selftest``: what a user on a new (GPU) machine runs first.

One report, exit status 1 on any failure:

1. **verify**: every backend available on the device against the float64 reference (the
   checks of ``python -m mmgrad verify``, on the device's tensors);
2. **speed**: each method's fused step against a copy of the same bytes (``memcpy``) at
   three sizes, per backend;
3. **CUDA graph**: a ``sync_free=True`` training step (calibration and a fused AdamW)
   captured in a CUDA graph and replayed, checked against the same steps run eagerly.

What cannot run here (no CUDA device, no triton) is listed as skipped, with the reason.
``--quick`` runs small sizes (tests/test_selftest.py runs it on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from ..backends import backends
from . import describe
from .bench import METHODS, make_case, step_bytes
from .timing import timeit
from .verify import TOLERANCE, compare_all, random_case

Tensor = torch.Tensor


@dataclasses.dataclass
class Report:
    lines: List[str] = dataclasses.field(default_factory=list)
    failures: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)

    def say(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.say(f"  FAIL {what}")

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.say(f"  skipped: {what}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_backends(device: torch.device) -> List[str]:
    return [n for n, i in backends().items() if i.available and n != "reference" and device.type in i.devices]


def check_backends(rep: Report, device: torch.device, quick: bool) -> None:
    rep.say(f"\n1. every backend on {device} against the float64 reference")
    names = _kernel_backends(device)
    if not names:
        rep.skip(f"no kernel backend runs on {device} tensors here ({_why_not(device)})")
        return
    gen = torch.Generator().manual_seed(int(time.time()) % 2**31)
    for b in names:
        worst: Dict[Tuple[str, torch.dtype], float] = {}
        # the GPU kernels take no float64 (triton runs on CPU tensors only under its interpreter)
        dtypes = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if b == "cpu" else ())
        for dt in dtypes:
            for m in ((2, 3) if quick else (1, 2, 3, 8)):
                for n in ((7, 1025) if quick else (1, 7, 1025, 70001)):
                    case = _on(random_case(m, n, dt, gen), device)
                    for fn, e in compare_all(b, case).items():
                        worst[(fn, dt)] = max(worst.get((fn, dt), 0.0), e)
        bad = [(fn, dt, e) for (fn, dt), e in worst.items() if not e <= TOLERANCE[dt]]
        top = max(worst.items(), key=lambda kv: kv[1] / TOLERANCE[kv[0][1]])
        rep.say(f"  {b}: {len(worst)} function x dtype pairs; worst {top[0][0]} {str(top[0][1])[6:]} {top[1]:.1e} "
                f"(tolerance {TOLERANCE[top[0][1]]:.0e})")
        for fn, dt, e in bad:
            rep.fail(f"{b} {fn} {dt}: error {e:.2e} above {TOLERANCE[dt]:.0e}")


def _on(case, device: torch.device):
    move = {f.name: getattr(case, f.name).to(device) for f in dataclasses.fields(case)
            if isinstance(getattr(case, f.name), Tensor) and f.name != "group_offsets"}
    return dataclasses.replace(case, **move)


def check_speed(rep: Report, device: torch.device, quick: bool) -> None:
    sizes = (1 << 16, 1 << 18, 1 << 20) if quick else ((1 << 20, 1 << 22, 1 << 24) if device.type == "cpu"
                                                       else (1 << 22, 1 << 24, 1 << 26))
    m = 4
    rep.say(f"\n2. each method's step against a copy of the same bytes, M = {m}, fp32, on {device}")
    names = _kernel_backends(device)
    if not names:
        rep.skip(f"no kernel backend runs on {device} tensors here ({_why_not(device)})")
        return
    rep.say(f"  {'backend':8s} {'method':9s} " + " ".join(f"{f'N={n:,}':>22s}" for n in sizes))
    if device.type == "cpu" and "triton" in names:  # TRITON_INTERPRET=1: Python speed, nothing to time
        rep.skip("timing triton on CPU tensors: it runs in Triton's interpreter here")
        names = [b for b in names if b != "triton"]
    for b in names:
        for method in METHODS:
            cells = []
            for n in sizes:
                nbytes = step_bytes(method, m, n)
                src = torch.ones(nbytes // 8, dtype=torch.float32, device=device)
                dst = torch.ones_like(src)  # touched: the copy counts no page faults
                step = make_case(method, m, n, b, device).fused
                t_step = timeit(lambda: (step(), _sync(device)), min_time=0.05 if quick else 0.3)
                t_copy = timeit(lambda: (dst.copy_(src), _sync(device)), min_time=0.05 if quick else 0.3)
                cells.append(f"{1e3 * t_step:8.2f} ms {100 * t_copy / t_step:5.0f} % cp")
            rep.say(f"  {b:8s} {method:9s} " + " ".join(f"{c:>22s}" for c in cells))


def check_cuda_graph(rep: Report, device: torch.device) -> None:
    rep.say("\n3. a sync_free=True step captured in a CUDA graph and replayed")
    if device.type != "cuda":
        rep.skip(f"needs a CUDA device ({_why_not(torch.device('cuda'))})")
        return
    if not backends()["triton"].available:
        rep.skip(f"needs the triton backend ({backends()['triton'].reason})")
        return
    for method in ("bogc", "mgda", "mimo"):
        try:
            err = _graph_vs_eager(method, device)
        except Exception as exc:  # noqa: BLE001 - a report, not a crash
            rep.fail(f"{method}: {type(exc).__name__}: {exc}")
            continue
        ok = err <= 1e-5
        rep.say(f"  {method}: 3 replays against 3 eager steps, parameters within {err:.1e}{'' if ok else '  FAIL'}")
        if not ok:
            rep.failures.append(f"cuda graph {method}: {err:.1e}")


def _graph_vs_eager(method: str, device: torch.device) -> float:
    """Parameters after 3 graph replays against 3 eager steps, same data, same start."""
    from ..calibrator import FusedCalibrator

    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(64, 6, device=device, generator=gen), torch.randn(64, 5, device=device, generator=gen),
                torch.randint(0, 3, (64,), device=device, generator=gen)) for _ in range(4)]
    finals = []
    for graphed in (False, True):
        torch.manual_seed(0)
        enc_a, enc_b = torch.nn.Linear(6, 8).to(device), torch.nn.Linear(5, 8).to(device)
        head = torch.nn.Linear(16, 3).to(device)
        params = [*enc_a.parameters(), *enc_b.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
        cal = FusedCalibrator([{"params": enc_a.parameters()}, {"params": enc_b.parameters()}], 3, method=method,
                              backend="triton", sync_free=True, skip_nonfinite=True).attach(opt)
        xa, xb, y = (t.clone() for t in batches[0])

        def step() -> None:
            opt.zero_grad(set_to_none=True)  # captured, backward then allocates .grad from the graph's pool
            za, zb = enc_a(xa), enc_b(xb)
            ce = torch.nn.functional.cross_entropy
            cal.backward([ce(head(torch.cat([za, zb], 1)), y), ce(head(torch.cat([za, za], 1)), y),
                          ce(head(torch.cat([zb, zb], 1)), y)])
            opt.step()

        step()  # warm-up: autotuning and lazy state happen outside the graph
        if graphed:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                step()  # a second warm-up on the side stream, as torch.cuda.graphs advises
            torch.cuda.current_stream(device).wait_stream(stream)
            with torch.cuda.graph(graph):
                step()
        for batch in batches[1:]:
            for dst, src in zip((xa, xb, y), batch):
                dst.copy_(src)
            graph.replay() if graphed else step()
        _sync(device)
        finals.append(torch.cat([p.detach().reshape(-1) for p in params]))
        cal.detach()
    return float((finals[0] - finals[1]).abs().max() / finals[0].abs().max())


def _why_not(device: torch.device) -> str:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device" + ("" if torch.version.cuda else "; this torch has no CUDA")
    return ", ".join(f"{n}: {i.reason}" for n, i in backends().items() if not i.available) or "see mmgrad.backends()"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgrad selftest", description=describe(__doc__))
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and fewer cases (a minute on a CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rep = Report()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    rep.say(f"mmgrad selftest on {device} (GPU: {gpu}); torch {torch.__version__}, CUDA {torch.version.cuda}")
    for name, info in backends().items():
        rep.say(f"  backend {name:9s} {'available' if info.available else 'unavailable'}: {info.reason}")
    if device.type == "cpu" and not torch.cuda.is_available():
        rep.skip(f"every GPU check on CUDA tensors ({_why_not(torch.device('cuda'))}); running the CPU ones")
    check_backends(rep, device, args.quick)
    check_speed(rep, device, args.quick)
    check_cuda_graph(rep, device)
    verdict = "FAILED: " + "; ".join(rep.failures) if rep.failures else "OK"
    rep.say(f"\nselftest: {verdict} ({len(rep.skipped)} skipped)")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
