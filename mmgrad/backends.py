"""Which kernel backends this installation has, and why a missing one is missing."""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
#: The oldest Triton the kernels are tested on (torch 2.11's; make matrix-check).
TRITON_MIN = (3, 6)


def triton_version() -> Tuple[str, Tuple[int, ...]]:
    """The installed Triton's version, as written and as (major, minor), from its metadata (not imported)."""
    from importlib.metadata import version

    found = version("triton")
    return found, tuple(int(p) for p in found.split("+")[0].split(".")[:2] if p.isdigit())


def triton_too_old() -> Optional[str]:
    """Why the installed Triton cannot run mmgrad's kernels, or None."""
    found, parts = triton_version()
    if parts < TRITON_MIN:
        want = ".".join(map(str, TRITON_MIN))
        return f"triton {found} is older than {want}, the oldest mmgrad supports (pip install -U 'triton>={want}')"
    return None


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    devices: tuple
    reason: str  # why it is unavailable, or what it runs on

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name:10s} {state:12s} {self.reason}"


_cpu_ext = None
_cpu_error: Optional[str] = None


def _load(module: str, kind: str, compile_why_not: str = ""):
    """The prebuilt extension (an install that saw torch, or ``make build``), else the one
    compiled on first use against this torch (mmgrad._jit). Raises ImportError with both reasons."""
    try:
        return importlib.import_module(module)
    except ImportError as prebuilt:  # not built at install, or built against another torch
        if compile_why_not:
            raise ImportError(f"{module} is not prebuilt ({prebuilt}), and {compile_why_not}") from None
        if os.environ.get("MMGRAD_NO_JIT") == "1":
            raise ImportError(f"{module} is not built ({prebuilt}) and MMGRAD_NO_JIT=1") from None
        from . import _jit

        try:
            return _jit.build(kind)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the backend unavailable, with the reason
            reason = str(exc).strip().splitlines()
            raise ImportError(f"{module} is not prebuilt, and compiling it failed: {reason[-1] if reason else type(exc).__name__}") from None


def cpu_extension():
    """The compiled C++/OpenMP kernels (``mmgrad._C``), or None (warned once) when they cannot be had."""
    global _cpu_ext, _cpu_error
    if _cpu_ext is None and _cpu_error is None:
        try:
            _cpu_ext = _load("mmgrad._C", "cpu")
        except ImportError as exc:
            _cpu_error = f"{exc}; `python -m mmgrad build --verbose` shows the compiler's output"
            if os.environ.get("MMGRAD_QUIET") != "1":
                warnings.warn(f"mmgrad: the cpu backend is unavailable: {_cpu_error}; CPU tensors run on the reference "
                              "backend (pure PyTorch, slower)", RuntimeWarning, stacklevel=3)
    return _cpu_ext


_cuda_ext = None
_cuda_error: Optional[str] = None


def cuda_extension():
    """The compiled CUDA kernels (``mmgrad._C_cuda``), or None. Only where torch has CUDA; compiled
    on first use only where a device is visible (minutes of nvcc for nothing otherwise)."""
    global _cuda_ext, _cuda_error
    if _cuda_ext is None and _cuda_error is None:
        if torch.version.cuda is None:
            _cuda_error = "torch has no CUDA here (the kernels are compile-checked by `make cuda-check`)"
        else:
            no_device = "" if torch.cuda.is_available() else "no CUDA device is visible to compile it for"
            try:
                _cuda_ext = _load("mmgrad._C_cuda", "cuda", no_device)
            except ImportError as exc:
                _cuda_error = str(exc)
    return _cuda_ext


def _cuda_info() -> BackendInfo:
    if cuda_extension() is None:
        return BackendInfo("cuda", False, (), _cuda_error or "")
    if not torch.cuda.is_available():
        return BackendInfo("cuda", False, (), "mmgrad._C_cuda loads, but no CUDA device is visible")
    return BackendInfo("cuda", True, ("cuda",), "CUDA C++ kernels (csrc/cuda) on CUDA tensors")


def _triton_info() -> BackendInfo:
    # Found, not imported: triton reads TRITON_INTERPRET when it is first imported, so
    # importing it here would fix the mode before a test (or user) sets it.
    if importlib.util.find_spec("triton") is None:
        return BackendInfo("triton", False, (), "triton is not installed (pip install triton)")
    too_old = triton_too_old()
    if too_old:
        return BackendInfo("triton", False, (), too_old)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendInfo("triton", True, ("cpu",), "Triton kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1: for tests, slow)")
    if torch.cuda.is_available():
        return BackendInfo("triton", True, ("cuda",), "Triton kernels on CUDA tensors")
    return BackendInfo("triton", False, (), "triton imports, but torch has no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, for testing)")


_cache: Dict[tuple, Dict[str, BackendInfo]] = {}


def backends() -> Dict[str, BackendInfo]:
    """Every backend with whether it can run here and why (not); cached per TRITON_INTERPRET.

    >>> import mmgrad
    >>> mmgrad.backends()["reference"].available
    True
    """
    key = (os.environ.get("TRITON_INTERPRET"),)
    if key in _cache:
        return _cache[key]
    cpu_ok = cpu_extension() is not None
    info = {
        "reference": BackendInfo("reference", True, ("cpu", "cuda"), "pure PyTorch, any device and float dtype"),
        "cpu": BackendInfo("cpu", cpu_ok, ("cpu",) if cpu_ok else (), "C++/OpenMP kernels" if cpu_ok else _cpu_error or ""),
        "triton": _triton_info(),
        "cuda": _cuda_info(),
    }
    _cache[key] = info
    return info


def resolve(backend: str, device: torch.device) -> str:
    """The backend ``"auto"`` picks for tensors on ``device``, or a checked explicit choice."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto', *BACKENDS]}; got {type(backend).__name__}")
    info = backends()
    if backend == "auto":
        # On CUDA tensors, triton first: the test suite executes its whole kernel logic
        # (under the interpreter), while the CUDA kernels are compiled and linked here but
        # never run (docs/spec.md §5; docs/backends.md).
        for name in ("triton", "cuda") if device.type == "cuda" else ("cpu",):
            if info[name].available:
                return name
        return "reference"
    if backend not in info:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}; got {backend!r}")
    b = info[backend]
    if not b.available:
        raise ValueError(f"backend {backend!r} is unavailable: {b.reason}")
    if device.type not in b.devices:
        raise ValueError(f"backend {backend!r} runs on {list(b.devices)} tensors; these are on {device}")
    return backend
