"""``make device-check OUT=dir``: every GPU path of mmgrad exercised on a lent GPU, in one call.

Runs in a bare checkout on the GPU image (python3 with its own torch and Triton, no
network), stops at its own time budget (``--budget``, 450 s by default), and writes
``report.json`` and ``device-check.log`` under the output directory. Steps, most
valuable first; each is skipped, with the reason, when it cannot run here or when the
budget left is below its estimate:

1. ``env``: GPU, driver, torch, Triton, nvcc, compute-sanitizer;
2. ``build``: ``mmgrad._C`` and ``mmgrad._C_cuda`` (sm_90), in place, all cores;
3. ``gpu-tests``: ``tests/test_gpu.py`` (both GPU backends on CUDA tensors against the
   float64 reference), in a process of its own;
4. ``selftest``: ``python -m mmgrad selftest`` (verify, speed, a CUDA-graph replay);
5. ``sanitizer``: compute-sanitizer memcheck and racecheck over one small step of each
   method on each GPU backend (tests/gpu_small_steps.py);
6. ``bench``: each method's step, and the Gram and combination kernels alone and fused, on
   both GPU backends against a device-to-device copy of the same bytes, CUDA events,
   N = 64 M and 256 M, M = 2, 4, 8, fp32 and bf16;
7. ``end-to-end``: a calibrated training step against a plain summed one, time and memory;
8. ``torchjd``: mgda against TorchJD's MGDA at N = 64 M (if torchjd can be imported);
9. ``suite``: the whole test suite with CUDA visible (interpreter tests included).

``--rehearse`` (CI, no GPU): every step that can run without one, at tiny sizes; the
report is written and checked against ``SCHEMA`` all the same. Exit status 1 if a step
failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("passed", "failed", "skipped")
#: Every report has these keys (and each step these); tests/test_device_check.py checks it.
SCHEMA = {"report": ("mmgrad", "started", "finished", "seconds", "budget_s", "rehearsal", "machine", "steps", "failed",
                     "skipped"),
          "step": ("name", "status", "seconds", "why", "data")}


class Check:
    def __init__(self, out: Path, budget: float, rehearse: bool):
        self.out, self.budget, self.rehearse = out, budget, rehearse
        self.start = time.time()
        self.steps: List[dict] = []
        self.log = open(out / "device-check.log", "w")

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def run(self, name: str, estimate: float, fn: Callable[["Check"], Optional[dict]]) -> None:
        """Runs a step, unless the budget left is under its estimate; a step raises
        ``Skip(why)`` when it cannot run here, anything else is a failure."""
        self.say(f"\n== {name} (about {estimate:.0f} s; {self.left():.0f} s of the budget left)")
        t0 = time.time()
        step = {"name": name, "status": "passed", "seconds": 0.0, "why": "", "data": {}}
        if self.left() < estimate:
            step.update(status="skipped", why=f"time budget: {self.left():.0f} s left, the step needs about {estimate:.0f} s")
        else:
            try:
                step["data"] = fn(self) or {}
            except Skip as why:
                step.update(status="skipped", why=str(why))
            except Exception as exc:  # noqa: BLE001 - reported, and the check goes on
                step.update(status="failed", why=f"{type(exc).__name__}: {exc}"[:4000])
        step["seconds"] = round(time.time() - t0, 1)
        self.say(f"== {name}: {step['status']} in {step['seconds']} s{(': ' + step['why']) if step['why'] else ''}")
        self.steps.append(step)

    def shell(self, cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None) -> str:
        """Runs a command into the log; raises on a non-zero exit or on the timeout."""
        self.say("$ " + " ".join(cmd))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                                 timeout=max(5.0, min(timeout, self.left())))
        except subprocess.TimeoutExpired as exc:
            self.log.write((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
            raise RuntimeError(f"timed out after {exc.timeout:.0f} s: {' '.join(cmd)}") from None
        self.log.write(res.stdout + res.stderr)
        self.log.flush()
        if res.returncode != 0:
            tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"exit status {res.returncode}: " + " | ".join(tail))
        return res.stdout + res.stderr

    def report(self) -> dict:
        rep = {"mmgrad": _version(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start)),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - self.start, 1),
               "budget_s": self.budget, "rehearsal": self.rehearse, "machine": _machine(), "steps": self.steps,
               "failed": [s["name"] for s in self.steps if s["status"] == "failed"],
               "skipped": [f"{s['name']}: {s['why']}" for s in self.steps if s["status"] == "skipped"]}
        validate(rep)
        return rep


class Skip(Exception):
    """The step cannot run here; the message says why."""


def validate(rep: dict) -> None:
    """The report's schema; raises ValueError naming the first thing wrong."""
    for key in SCHEMA["report"]:
        if key not in rep:
            raise ValueError(f"report lacks {key!r}")
    for step in rep["steps"]:
        for key in SCHEMA["step"]:
            if key not in step:
                raise ValueError(f"step {step.get('name')!r} lacks {key!r}")
        if step["status"] not in STATUSES:
            raise ValueError(f"step {step['name']!r} has status {step['status']!r}, not one of {STATUSES}")
        if step["status"] != "passed" and not step["why"]:
            raise ValueError(f"step {step['name']!r} is {step['status']} without saying why")
    json.dumps(rep)  # plain data throughout


def _version() -> str:
    return (ROOT / "mmgrad" / "_version.py").read_text().split('"')[1]


def _machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _need_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA device" + ("" if torch.version.cuda else " (this torch has no CUDA)"))


# ------------------------------------------------------------------------------ steps
def step_env(c: Check) -> dict:
    data = _machine()
    for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]),
                       ("nvcc", ["--version"]), ("compute-sanitizer", ["--version"])):
        path = shutil.which(tool)
        data[tool] = subprocess.run([path, *args], capture_output=True, text=True).stdout.strip().splitlines()[-1:] if path else None
    c.say(json.dumps(data, indent=1))
    return data


def step_build(c: Check) -> dict:
    env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), "MAX_JOBS": str(os.cpu_count() or 2)}
    c.shell([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], timeout=300, env=env)
    probe = c.shell([sys.executable, "-c", "import mmgrad; [print(i) for i in mmgrad.backends().values()]"], timeout=60)
    return {"backends": probe.strip().splitlines()}


def step_gpu_tests(c: Check) -> dict:
    # workers compile Triton's specialisations in parallel (they share its disk cache)
    args = ["-x"] if c.rehearse else (["-n", str(min(8, os.cpu_count() or 1))] if _has_xdist() else [])
    out = c.shell([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py", *args],
                  timeout=300, env={"TRITON_INTERPRET": "0", "MMGRAD_QUIET": "1"})
    summary = out.strip().splitlines()[-1]
    if " passed" not in summary:
        raise Skip(f"no GPU test ran: {summary}")
    return {"summary": summary}


def step_selftest(c: Check) -> dict:
    out = c.shell([sys.executable, "-m", "mmgrad", "selftest", *(["--quick"] if c.rehearse else [])], timeout=240,
                  env={"MMGRAD_QUIET": "1"})
    return {"summary": out.strip().splitlines()[-1]}


def step_sanitizer(c: Check) -> dict:
    _need_gpu()
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        raise Skip("compute-sanitizer is not on PATH")
    script = [sys.executable, "tests/gpu_small_steps.py"]
    c.shell(script, timeout=120, env={"MMGRAD_QUIET": "1"})  # Triton compiles outside the sanitizer
    data = {}
    for check in ("memcheck", "racecheck"):
        out = c.shell([tool, "--tool", check, "--error-exitcode", "1", "--target-processes", "all", *script],
                      timeout=150, env={"MMGRAD_QUIET": "1"})
        data[check] = [line for line in out.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line][-1:]
    return data


def step_bench(c: Check) -> dict:
    import torch

    from mmgrad import ops
    from mmgrad.backends import backends

    if c.rehearse:
        device, sizes, ms, dtypes, names = torch.device("cpu"), (1 << 12,), (2,), (torch.float32,), ["cpu"]
    else:
        _need_gpu()
        device, sizes, ms, dtypes = torch.device("cuda"), (1 << 26, 1 << 28), (2, 4, 8), (torch.float32, torch.bfloat16)
        names = ["triton", "cuda"]
    names = [b for b in names if backends()[b].available]
    if not names:
        raise Skip("no kernel backend runs here")
    rows = []
    for n in sizes:
        for m in ms:
            for dt in dtypes:
                g = torch.randn(m, n, device=device, dtype=torch.float32).to(dt)
                out = torch.empty(n, device=device, dtype=dt)
                mean = torch.zeros(m, n, device=device)
                var = torch.zeros(m, n, device=device)
                off = torch.tensor([0, n])
                weights = torch.full((1, m), 1.0 / m, dtype=torch.float64, device=device)
                steps = {
                    "bogc": lambda b: ops.bogc_step(g, mean, var, 5, mean_out=mean, var_out=var, out=out, backend=b),
                    "mgda": lambda b: ops.combine_and_gram(g, ops.moo_weights(ops.gram(g, group_offsets=off, backend=b),
                                                                              "mgda", backend=b), group_offsets=off,
                                                           out=out, with_gram=False, backend=b),
                    "combine": lambda b: ops.combine_and_gram(g, weights, group_offsets=off, out=out, with_gram=False,
                                                              backend=b),
                    "gram": lambda b: ops.gram(g, group_offsets=off, backend=b),
                    "combine_and_gram": lambda b: ops.combine_and_gram(g, weights, group_offsets=off, out=out, backend=b),
                }
                # bytes each step must move at least: G once per read, the state read and written
                moved = {"bogc": g.numel() * g.element_size() + 4 * mean.numel() * 4 + out.numel() * out.element_size(),
                         "mgda": 2 * g.numel() * g.element_size() + out.numel() * out.element_size(),
                         "combine": g.numel() * g.element_size() + out.numel() * out.element_size(),
                         "gram": g.numel() * g.element_size(),
                         "combine_and_gram": g.numel() * g.element_size() + out.numel() * out.element_size()}
                for method, fn in steps.items():
                    src = torch.ones(moved[method] // 2, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    copy_s = _time(lambda: dst.copy_(src), device)
                    del src, dst
                    for b in names:
                        t = _time(lambda: fn(b), device)
                        row = {"backend": b, "method": method, "n": n, "m": m, "dtype": str(dt)[6:], "ms": round(1e3 * t, 3),
                               "copy_ms": round(1e3 * copy_s, 3), "pct_copy": round(100 * copy_s / t, 1),
                               "gbps": round(moved[method] / t / 1e9, 1)}
                        rows.append(row)
                        c.say(" ".join(f"{k}={v}" for k, v in row.items()))
                del g, out, mean, var
    return {"rows": rows}


def _time(fn: Callable[[], object], device) -> float:
    """Median seconds per call: CUDA events on a GPU (after a warm-up), else the wall clock."""
    import statistics

    import torch

    fn()
    times = []
    for _ in range(5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_end_to_end(c: Check) -> dict:
    import torch

    import mmgrad
    from mmgrad.tools.bench_step import M, make_batch, make_model

    if c.rehearse:
        device, hidden, embed, batch = torch.device("cpu"), 32, 16, 16
    else:
        _need_gpu()
        device, hidden, embed, batch = torch.device("cuda"), 2048, 704, 256
    x, y = make_batch(batch)
    x, y = {k: v.to(device) for k, v in x.items()}, y.to(device)
    rows = {}
    for method in ("plain", "bogc", "mgda", "mimo"):
        model = make_model(hidden, embed).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        cal = None if method == "plain" else mmgrad.FusedCalibrator(model.param_groups(), M, method=method).attach(opt)

        def step():
            losses = model.losses(x, y)
            if cal is None:
                torch.stack(losses).sum().backward()
            else:
                cal.backward(losses)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = _time(step, device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        rows[method] = {"ms": round(1e3 * t, 3), "peak_mib": round(peak / 2**20, 1)}
        c.say(f"{method}: {rows[method]}")
        if cal is not None:
            cal.detach()
        del model, opt, cal
    for method, row in rows.items():
        row["vs_plain"] = round(row["ms"] / rows["plain"]["ms"], 3)
    return rows


def step_torchjd(c: Check) -> dict:
    import torch

    try:
        from torchjd.aggregation import MGDA
    except ImportError as exc:
        raise Skip(f"torchjd cannot be imported ({exc}); carry its wheel (the device README says how)") from None
    from mmgrad import ops

    if c.rehearse:
        device, n, m = torch.device("cpu"), 1 << 12, 4
    else:
        _need_gpu()
        device, n, m = torch.device("cuda"), 1 << 26, 4
    g = torch.randn(m, n, device=device)
    off = torch.tensor([0, n])
    out = torch.empty(n, device=device)
    theirs = MGDA()
    mine_s = _time(lambda: ops.combine_and_gram(g, ops.moo_weights(ops.gram(g, group_offsets=off), "mgda"),
                                                group_offsets=off, out=out, with_gram=False), device)
    theirs_s = _time(lambda: theirs(g), device)
    ref = theirs(g)
    ops.combine_and_gram(g, ops.moo_weights(ops.gram(g, group_offsets=off), "mgda"), group_offsets=off, out=out,
                         with_gram=False)
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    c.say(f"mgda {1e3 * mine_s:.2f} ms, torchjd MGDA {1e3 * theirs_s:.2f} ms: {theirs_s / mine_s:.1f}x; directions {rel:.1e} apart")
    return {"n": n, "m": m, "mmgrad_ms": round(1e3 * mine_s, 3), "torchjd_ms": round(1e3 * theirs_s, 3),
            "speedup": round(theirs_s / mine_s, 2), "relative_difference": rel}


def step_suite(c: Check) -> dict:
    if c.rehearse:
        raise Skip("the rehearsal runs inside `make test`, which runs the suite itself")
    workers = ["-n", str(min(8, os.cpu_count() or 1))] if _has_xdist() else []
    out = c.shell([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu_proof and not gpu",
                   "tests", *workers], timeout=300, env={"MMGRAD_QUIET": "1"})
    return {"summary": out.strip().splitlines()[-1]}


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


STEPS = (("env", 5, step_env), ("build", 150, step_build), ("gpu-tests", 90, step_gpu_tests), ("selftest", 60, step_selftest),
         ("sanitizer", 90, step_sanitizer), ("bench", 90, step_bench), ("end-to-end", 20, step_end_to_end),
         ("torchjd", 10, step_torchjd), ("suite", 120, step_suite))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for report.json and device-check.log")
    p.add_argument("--budget", type=float, default=450.0, help="seconds in all (default 450)")
    p.add_argument("--rehearse", action="store_true", help="no GPU: what can run without one, at tiny sizes")
    p.add_argument("--only", default="", help="comma-separated step names (default: all)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    check = Check(args.out, args.budget, args.rehearse)
    only = {s for s in args.only.split(",") if s}
    for name, estimate, fn in STEPS:
        if not only or name in only:
            check.run(name, 1.0 if args.rehearse else estimate, fn)
    rep = check.report()
    (args.out / "report.json").write_text(json.dumps(rep, indent=1))
    check.say(f"\ndevice-check: {len(rep['failed'])} failed ({', '.join(rep['failed']) or 'none'}), "
              f"{len(rep['skipped'])} skipped, {rep['seconds']} s; report {args.out / 'report.json'}")
    return 1 if rep["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
