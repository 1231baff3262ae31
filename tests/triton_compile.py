"""Compile the Triton kernels ahead of time to cubin for sm_80 and sm_90, without a GPU.

``python tests/triton_compile.py`` (run by ``make gpu-proofs`` as ``make triton-check``) builds
each kernel of ``mmgrad/kernels/triton_kernels.py`` with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` at the specialisations the backend launches (listed
by ``specialisations()``), runs ``ptxas -v`` on the PTX for registers, shared memory and
spills (with the ptxas Triton built the cubin with), and keeps each kernel's TTIR for the 64-bit offset check. The interpreter accepts
programs the compiler rejects; this is the compiler's word. tests/test_triton_compile.py
fails on any compile error, spill, or 32-bit tensor offset.

Results are cached in build/triton/ by a hash of the kernel source and the Triton and
ptxas versions (Triton also caches its own builds in ~/.triton).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple


ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "mmgrad" / "kernels" / name for name in ("triton_kernels.py", "triton_dual_cone.py")]
#: the kernels whose offsets are tiny (an M x M Gram): 32-bit offsets are fine there
SOLVERS = ("_moo_weights_kernel", "_dual_cone_kernel")
CACHE = ROOT / "build" / "triton"
ARCHS = (80, 90)
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ADDPTR = re.compile(r"tt\.addptr [^:]+: (.+?), (tensor<[^>]*x(i\d+)>|(i\d+)) loc")

GRAD_DTYPES = ("fp32", "bf16", "fp16")


def configs(cfgs=None) -> List[Tuple[int, int]]:
    """(BLOCK, compile options) of the kernels' autotune configs (the combination's, or
    ``cfgs``): num_warps, and maxnreg where the config sets it (it changes ptxas's
    register budget, so the check must too)."""
    from mmgrad.kernels import triton_kernels as T

    return [(c.kwargs["BLOCK"], {"num_warps": c.num_warps, **({"maxnreg": c.maxnreg} if c.maxnreg else {})})
            for c in (T._CONFIGS if cfgs is None else cfgs)]


def specialisations() -> List[Tuple[str, Dict[str, str], Dict[str, object], Dict[str, int]]]:
    """(kernel, signature, constexprs, compile options) for every build of the check.

    The backend launches the BOGC kernel with M = |R| of a segment (any objective count),
    the combination kernel likewise, and the solver with M <= 16. Built: every autotune
    config at every M up to triton_kernels.MAX_OBJECTIVES (8; the sample estimator up to
    SAMPLE_MAX_OBJECTIVES, 4); in the config with the most coordinates per thread, every
    gradient dtype x state dtype x confidence x weights x estimator at M = 4, and each of
    those values alone at M = 8 (an M = 8 build takes ~20 s, the full product there would
    take 10 minutes); the combination's three modes; 64-bit scalar arguments (n >= 2**31);
    and the solver at M in {2, 3, 4, 8, 16} for each method and normalisation.
    """
    from mmgrad.kernels import triton_dual_cone as D
    from mmgrad.kernels import triton_kernels as T

    specs = []
    heavy = max(configs(), key=lambda c: c[0] / c[1]["num_warps"])

    def bogc(m, g="fp32", state="fp32", source=0, conf=0, weights=0, block=256, options=None, index="i32"):
        if options is not None and T.bogc_configs(m) is not T._CONFIGS:  # the launch's configs at this M
            block, options = configs(T.bogc_configs(m))[0]
        sig = {"g_ptr": f"*{g}", "m_ptr": f"*{state}", "v_ptr": f"*{state}", "mo_ptr": f"*{state}", "vo_ptr": f"*{state}",
               "out_ptr": "*fp32" if g != "fp32" else f"*{g}", "part_ptr": "*fp64", "n": index, "lo": index,
               "hi": index, "S": "i32", "commit_ptr": "*i64", "alpha_ptr": "*fp64",
               "gamma": "fp32", "eps": "fp32", "M": "constexpr", "SOURCE": "constexpr", "CONFIDENCE": "constexpr",
               "WEIGHTS": "constexpr", "BLOCK": "constexpr"}
        specs.append(("_bogc_kernel", sig, {"M": m, "SOURCE": source, "CONFIDENCE": conf, "WEIGHTS": weights, "BLOCK": block}, options))

    def combine(m, g="fp32", with_out=True, with_gram=False, block=256, options=None, index="i32"):
        sig = {"g_ptr": f"*{g}", "alpha_ptr": "*fp64", "out_ptr": f"*{g}", "part_ptr": "*fp64", "n": index, "lo": index,
               "hi": index, "M": "constexpr", "WITH_OUT": "constexpr", "WITH_GRAM": "constexpr", "BLOCK": "constexpr"}
        specs.append(("_combine_gram_kernel", sig, {"M": m, "WITH_OUT": with_out, "WITH_GRAM": with_gram, "BLOCK": block}, options))

    for m in range(1, T.MAX_OBJECTIVES + 1):
        for block, options in configs():
            bogc(m, block=block, options=options)
            combine(m, with_gram=True, block=block, options=options)
            if m <= T.SAMPLE_MAX_OBJECTIVES:
                bogc(m, source=1, block=block, options=options)
    for g in GRAD_DTYPES:  # every dtype x flag combination at M = 4 ...
        for state in ("fp32", "bf16"):
            for conf in (0, 1, 2):
                for weights in (0, 1):
                    bogc(4, g=g, state=state, conf=conf, weights=weights, block=heavy[0], options=heavy[1])
        bogc(4, g=g, source=1, block=heavy[0], options=heavy[1])
        for with_out, with_gram in ((True, False), (True, True), (False, True)):
            combine(4, g=g, with_out=with_out, with_gram=with_gram, block=heavy[0], options=heavy[1])
    top, big = T.MAX_OBJECTIVES, dict(block=heavy[0], options=heavy[1])  # ... and each one alone at the largest M
    for kw in ({"g": "bf16"}, {"g": "fp16"}, {"state": "bf16"}, {"conf": 1}, {"conf": 2}, {"weights": 1}):
        bogc(top, **kw, **big)
    for g in ("bf16", "fp16"):
        combine(top, g=g, with_gram=True, **big)
    bogc(2, index="i64", block=heavy[0], options=heavy[1])
    combine(2, with_gram=True, index="i64", block=heavy[0], options=heavy[1])
    for m in (2, 3, 4, 8, 16):
        mb = max(2, 1 << (m - 1).bit_length())
        for method, normalize in ((0, 0), (0, 1), (0, 2), (1, 0)):
            sig = {"k_ptr": "*fp64", "loss_ptr": "*fp64", "w_ptr": "*fp64", "magnitude": "fp32", "TARGET": "fp32",
                   "M": "constexpr", "MB": "constexpr", "METHOD": "constexpr", "NORMALIZE": "constexpr", "ITERS": "constexpr",
                   "BISECTIONS": "constexpr"}
            specs.append(("_moo_weights_kernel", sig, {"M": m, "MB": mb, "METHOD": method, "NORMALIZE": normalize,
                                                        "ITERS": T.MOO_ITERATIONS, "BISECTIONS": T.MOO_BISECTIONS},
                          {"num_warps": T.moo_warps(mb), "maxnreg": T.MOO_MAXNREG}))
        sig = {"k_ptr": "*fp64", "u_ptr": "*fp64", "eps_ptr": "*fp64", "v_ptr": "*fp64", "M": "constexpr",
               "MB": "constexpr", "ITERS": "constexpr", "BISECTIONS": "constexpr", "CROSSOVERS": "constexpr"}
        specs.append(("_dual_cone_kernel", sig, {"M": m, "MB": mb, "ITERS": D.DUAL_CONE_ITERATIONS,
                                                 "BISECTIONS": T.MOO_BISECTIONS, "CROSSOVERS": D.DUAL_CONE_CROSSOVERS},
                      {"num_warps": T.moo_warps(mb), "maxnreg": T.MOO_MAXNREG}))
    return specs


def _name(kernel: str, constexprs: Dict[str, object], sig: Dict[str, str], options: Dict[str, int], arch: int) -> str:
    types = ",".join(v.lstrip("*") for v in sig.values() if v != "constexpr")
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
    opts = ",".join(f"{k.replace('num_', '')}={v}" for k, v in options.items())
    return f"{kernel}[{flags},{opts}]({types})@sm_{arch}"


def ptxas_candidates() -> List[str]:
    """The ptxas builds Triton ships (it compiles with the newest, ``ptxas-blackwell``,
    whose PTX ISA nvcc 13.0's ptxas does not read), then the one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [str(p) for p in (bundled / "ptxas-blackwell", bundled / "ptxas") if p.exists()]
    found += [shutil.which("ptxas")] if shutil.which("ptxas") else []
    if not found:
        raise FileNotFoundError("no ptxas: neither Triton's bundled ones nor one on PATH")
    return found


def _ptxas(ptx: str) -> Dict[str, int]:
    """ptxas -v on the PTX with the first ptxas that reads its ISA version."""
    target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for tool in ptxas_candidates():
            # Triton's own ptxas options (backends/nvidia/compiler.py make_cubin), so these
            # are the figures of the cubin it builds
            cmd = [tool, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", f.name, "-o", os.devnull]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(f"no ptxas assembles this PTX: {res.stderr.strip()[:300]}")
    finally:
        os.unlink(f.name)
    info = res.stderr + res.stdout
    stack, spill_st, spill_ld = (int(x) for x in _SPILL.search(info).groups())
    return {"registers": int(_USED.search(info).group(1)), "stack": stack, "spill_stores": spill_st,
            "spill_loads": spill_ld, "ptxas": Path(tool).name}


def _compile_mode() -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly


def _build(job: Tuple[str, Dict[str, str], Dict[str, object], int, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmgrad.kernels import triton_dual_cone as D
    from mmgrad.kernels import triton_kernels as T

    kernel, sig, constexprs, options, arch = job
    row = {"name": _name(kernel, constexprs, sig, options, arch), "kernel": kernel, "arch": f"sm_{arch}"}
    try:
        compiled = triton.compile(ASTSource(getattr(D if hasattr(D, kernel) else T, kernel), sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # noqa: BLE001 - reported, and the test fails on it
        return {**row, "error": f"{type(err).__name__}: {err}"[:2000]}
    row.update(_ptxas(compiled.asm["ptx"]))
    row["shared"] = int(compiled.metadata.shared)
    row["cubin_bytes"] = len(compiled.asm["cubin"])
    row["offset_types"] = offset_types(compiled.asm["ttir"])
    return row


def offset_types(ttir: str) -> List[str]:
    """Integer types of the offsets added to pointers: every tensor offset, and every
    scalar offset that is not a compile-time constant (an ``arith.constant``)."""
    constants = set(re.findall(r"(%[\w.]+) = arith\.constant", ttir))
    types = set()
    for m in _ADDPTR.finditer(ttir):
        offset = m.group(0).split(",")[1].split(":")[0].strip()
        if m.group(3) or offset not in constants:
            types.add(m.group(3) or m.group(4))
    return sorted(types)


def _key() -> str:
    import triton

    h = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + Path(__file__).read_bytes() + triton.__version__.encode())
    for tool in ptxas_candidates():
        h.update(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def compile_all(workers: int = 2) -> List[dict]:
    """One row per (specialisation, arch); cached by the sources' hash."""
    cached = CACHE / f"triton-{_key()}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    jobs = [(k, sig, c, w, arch) for k, sig, c, w in specialisations() for arch in ARCHS]
    # the slow builds first, so the two workers finish together
    jobs.sort(key=lambda j: -(j[2].get("M", 1) ** 2))
    # fresh processes (spawn): one that forked from a test run would inherit kernels that
    # Triton's interpreter had defined; the workers compile, and set so before importing Triton
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_compile_mode) as pool:
        rows = list(pool.map(_build, jobs))
    rows.sort(key=lambda r: r["name"])
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(rows, indent=1))
    return rows


def main() -> int:
    rows = compile_all()
    print(f"{'kernel build':100s} {'regs':>5s} {'smem':>6s} {'stack':>6s} {'spills':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:100s} ERROR {r['error'][:200]}")
            continue
        print(f"{r['name']:100s} {r['registers']:5d} {r['shared']:6d} {r['stack']:6d} {r['spill_stores']:3d}/{r['spill_loads']:<3d}")
    errors = sum("error" in r for r in rows)
    spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) > 0 for r in rows)
    narrow = sum("i32" in r.get("offset_types", []) for r in rows if r["kernel"] not in SOLVERS)
    top = max((r for r in rows if "registers" in r), key=lambda r: r["registers"])
    print(f"triton-check: {len(rows)} kernel builds (sm_80, sm_90), {errors} compile errors, {spills} with spills, "
          f"{narrow} with 32-bit pointer offsets; most registers {top['registers']} ({top['name']})")
    return 1 if errors or spills or narrow else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
