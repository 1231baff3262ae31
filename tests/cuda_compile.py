"""Compile every csrc/**/*.cu with nvcc for sm_80 and sm_90 and read ptxas's resource report.

``python tests/cuda_compile.py`` (run by ``make gpu-proofs`` as ``make cuda-check``) prints
registers, shared memory and spills per kernel; tests/test_cuda_compile.py fails on any
warning (``--Werror all-warnings``) or local-memory spill. Results are cached in
build/cuda/ by a hash of the sources and the nvcc version, so an unchanged tree is not
recompiled. The kernels are compiled, not run: no machine of this project has a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90")
CACHE = ROOT / "build" / "cuda"

_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def nvcc() -> str | None:
    return shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


def _key(sources: List[Path], compiler: str) -> str:
    h = hashlib.sha256(subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.encode())
    for p in sorted(sources + list((ROOT / "csrc").rglob("*.h"))):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _demangle(names: List[str]) -> Dict[str, str]:
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def compile_all() -> List[dict]:
    """One row per (kernel, arch): registers, smem, stack, spill bytes; raises on a compile error."""
    compiler = nvcc()
    if compiler is None:
        raise FileNotFoundError("nvcc is not on PATH")
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    cached = CACHE / f"resources-{_key(sources, compiler)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    rows = []
    for src in sources:
        for arch in ARCHS:
            cmd = [compiler, "-std=c++20", "-O3", "--Werror", "all-warnings", "-Xptxas", "-v",
                   f"-gencode=arch=compute_{arch[3:]},code={arch}", "-c", str(src), "-o", "/dev/null"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed for {src.name} ({arch}):\n{res.stderr}")
            current = None
            for line in res.stderr.splitlines():
                if m := _FUNC.search(line):
                    current = {"source": src.name, "kernel": m.group(1), "arch": m.group(2)}
                elif current is not None and (m := _SPILL.search(line)):
                    current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
                elif current is not None and (m := _USED.search(line)):
                    smem = _SMEM.search(line)
                    current.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
                    rows.append(current)
                    current = None
    names = _demangle([r["kernel"] for r in rows])
    for r in rows:
        r["kernel"] = names[r["kernel"]].split("(")[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(rows, indent=1))
    return rows


def check_binding() -> str:
    """Compile csrc/cuda/bindings.cpp against torch's CUDA headers (syntax and types only:
    the CPU wheel ships the headers but not libc10_cuda, so it cannot link here).
    Returns "" when it compiles, else the compiler's errors; cached like the kernels."""
    compiler = nvcc()
    src = ROOT / "csrc" / "cuda" / "bindings.cpp"
    if compiler is None or not src.exists():
        return ""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    homes = [Path(compiler).resolve().parent.parent, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]
    cuda_include = next((h / "include" for h in homes if (h / "include" / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        return ""  # no CUDA runtime headers to compile against
    cached = CACHE / f"binding-{_key([src], compiler)}.ok"
    if cached.exists():
        return ""
    # The one header a CUDA build of torch generates at configure time, missing from the
    # CPU wheel; its content in CUDA wheels is this one line.
    stub = CACHE / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in include_paths()], f"-I{stub}", f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return res.stderr
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.touch()
    return ""


def main() -> int:
    if nvcc() is None:
        print("cuda-check: nvcc not found, skipped")
        return 0
    rows = compile_all()
    print(f"{'kernel':60s} {'arch':6s} {'regs':>5s} {'smem B':>7s} {'stack B':>8s} {'spill st/ld B':>14s}")
    for r in rows:
        print(f"{r['kernel'][:60]:60s} {r['arch']:6s} {r['registers']:5d} {r['smem']:7d} {r['stack']:8d} {r['spill_stores']:7d}/{r['spill_loads']:<6d}")
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"cuda-check: {len(rows)} kernel builds, {len(spills)} with local-memory spills")
    binding_errors = check_binding()
    print("cuda-check: csrc/cuda/bindings.cpp " + ("does NOT compile against torch's CUDA headers:\n" + binding_errors if binding_errors
                                                  else "compiles against torch's CUDA headers (not linked: no libc10_cuda in the CPU wheel)"))
    return 1 if spills or binding_errors else 0


if __name__ == "__main__":
    sys.exit(main())
