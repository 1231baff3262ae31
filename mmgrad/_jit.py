"""Compile mmgrad's C++ and CUDA kernels against the torch that is installed, on first use.

pip builds a wheel in an isolated environment that cannot see the user's torch, and an
extension built against another torch would not load. So the wheel carries the sources
(``mmgrad/_csrc``), and the first use compiles them here with the user's torch and
compiler. The result is cached per mmgrad version, torch version, Python and source hash
under ``~/.cache/mmgrad`` (``MMGRAD_CACHE`` moves it). torch's builder locks the
directory, so concurrent processes (DDP ranks) build once. ``python -m mmgrad build``
does it ahead of time. An install that could see torch (``--no-build-isolation``, or
``make build`` in a checkout) has prebuilt ``mmgrad._C`` / ``mmgrad._C_cuda`` and never
comes here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from . import _build_config as C
from ._version import __version__

KINDS = {"cpu": ("mmgrad_C", C.CPU_SOURCES), "cuda": ("mmgrad_C_cuda", C.CUDA_SOURCES)}


def source_dir() -> Path | None:
    """The C++/CUDA sources: inside the installed package, or a checkout's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "mmgrad_math.h").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("MMGRAD_CACHE") or Path.home() / ".cache" / "mmgrad")


def build_dir(kind: str, src: Path) -> Path:
    """One directory per mmgrad version, torch, Python, flags and source contents."""
    import torch

    digest = hashlib.sha256(" ".join(C.cpu_flags() + C.CUDA_NVCC_FLAGS).encode())
    for rel in sorted(C.CPU_SOURCES + C.CUDA_SOURCES + C.HEADERS):
        digest.update((src / rel).read_bytes())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / f"{kind}-{__version__}-torch{torch.__version__}-{py}-{digest.hexdigest()[:12]}"


def build(kind: str, *, verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) the ``"cpu"`` or ``"cuda"`` extension.

    Raises ``ImportError`` naming what is missing: the sources, a compiler, or a CUDA
    toolkit; a failed compilation raises torch's error with the compiler's output.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
    import torch
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise ImportError("mmgrad's C++ sources are not installed beside it (mmgrad/_csrc)")
    name, sources = KINDS[kind]
    out = build_dir(kind, src)
    built = sorted(out.glob(f"{name}*.so"))
    if built:  # the directory is keyed by the sources' contents: no compiler, no ninja run needed
        return _import(name, built[0])
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(f"no C++ compiler: {compiler!r} is not on PATH (install one, or set CXX)")
    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        raise ImportError("no CUDA toolkit found (set CUDA_HOME to the directory that holds bin/nvcc)")
    out.mkdir(parents=True, exist_ok=True)
    print(f"mmgrad: compiling the {kind} kernels for torch {torch.__version__} into {out} "
          "(once; a minute or more)", file=sys.stderr, flush=True)
    kwargs = dict(name=name, sources=[str(src / rel) for rel in sources], build_directory=str(out), verbose=verbose,
                  extra_include_paths=[str(src)])
    if kind == "cpu":
        return cpp_extension.load(extra_cflags=C.cpu_flags(), extra_ldflags=C.CPU_LINK_FLAGS, **kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", C.CUDA_ARCHS)
    return cpp_extension.load(extra_cflags=C.CUDA_CXX_FLAGS, extra_cuda_cflags=C.CUDA_NVCC_FLAGS, **kwargs)


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
