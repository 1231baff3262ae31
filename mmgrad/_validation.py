"""Argument checks shared by the reference, the kernel wrappers and the calibrator.

Every check raises ``TypeError`` for a wrong kind of value and ``ValueError`` for a
wrong value, and names the argument, so a user sees which call site to fix.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

from ._constants import (CONFIDENCE_MODES, DUAL_CONE_MIN_REG_EPS, MGDA_NORMALIZATIONS, MOO_MAX_OBJECTIVES,  # noqa: F401
                         MOO_METHOD_CODES, MOO_METHODS, NORMALIZE_CODES, WEIGHT_MODES)

# eps below this makes 1/eps overflow float32 (mmgrad's own bound).
MIN_EPS = 1e-30


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def check_float_tensor(name: str, t: object, *, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype {[str(d) for d in FLOAT_DTYPES]}; got {t.dtype}")
    if t.is_sparse:
        raise TypeError(f"{name} must be a dense tensor; got a sparse one")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions; got shape {tuple(t.shape)}")
    return t


def check_same_shape(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> None:
    names, tensors = list(names), list(tensors)
    shape = tensors[0].shape
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != shape:
            raise ValueError(f"{n} must have the shape of {names[0]} {tuple(shape)}; got {tuple(t.shape)}")
    device = tensors[0].device
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != device:
            raise ValueError(f"{n} is on {t.device} but {names[0]} is on {device}")


def check_positive(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= minimum:
        raise ValueError(f"{name} must be finite and > {minimum:g}; got {value!r}")
    return value


def check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a real number; got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1); got {beta!r}")
    return beta


def check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int (the 1-based count of EMA updates); got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after this update); got {step}")
    return step


def check_bogc_options(gamma: object, eps: object, confidence: object, weights: object) -> tuple[float, float]:
    gamma = check_positive("gamma", gamma)
    eps = check_positive("eps", eps, minimum=0.0)
    if eps < MIN_EPS:
        raise ValueError(f"eps must be >= {MIN_EPS:g} so that 1/eps is finite in float32; got {eps!r}")
    check_choice("confidence", confidence, CONFIDENCE_MODES)
    check_choice("weights", weights, WEIGHT_MODES)
    return gamma, eps


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' byte spans in one storage intersect (exact for contiguous ones)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def check_out(out: object, g: torch.Tensor, *, unrounded: bool = False) -> torch.Tensor:
    """A kernel's output vector over ``g`` (``... x N``), or a new one when ``out`` is None:
    length N, contiguous, on g's device, in g's dtype (with ``unrounded``, the BOGC steps,
    also float32 for half g: it receives the output unrounded, as the calibrator
    norm-matches several segments together and rounds once), and sharing no memory with g,
    which the kernels read while they write ``out``."""
    if out is None:
        return torch.empty(g.shape[-1], dtype=g.dtype, device=g.device)
    out = check_float_tensor("out", out, dim=1)
    allowed = (g.dtype, torch.float32) if unrounded and g.dtype in (torch.float16, torch.bfloat16) else (g.dtype,)
    if out.dtype not in allowed or out.shape != (g.shape[-1],):
        raise ValueError(f"out must be a {' or '.join(map(str, allowed))} vector of length {g.shape[-1]}; "
                         f"got {out.dtype} {tuple(out.shape)}")
    if out.device != g.device:
        raise ValueError(f"out is on {out.device} but the gradients are on {g.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (call .contiguous() on it)")
    if shares_memory(out, g):
        raise ValueError("out shares memory with the gradients it is computed from; pass a separate tensor")
    return out


def check_group_offsets(group_offsets: torch.Tensor | None, n: int) -> torch.Tensor:
    """Offsets ``[0, n_1, ..., N]`` of the parameter groups along N (int64, CPU)."""
    if group_offsets is None:
        return torch.tensor([0, n], dtype=torch.int64)
    if not isinstance(group_offsets, torch.Tensor):
        group_offsets = torch.as_tensor(group_offsets)
    if group_offsets.dtype not in (torch.int32, torch.int64) or group_offsets.dim() != 1:
        raise TypeError("group_offsets must be a 1-D integer tensor [0, ..., N]")
    off = group_offsets.to(device="cpu", dtype=torch.int64)
    if off.numel() < 2 or int(off[0]) != 0 or int(off[-1]) != n or bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"group_offsets must rise from 0 to N={n}; got {off.tolist()}")
    return off


def check_moo_call(backend: str, grams: torch.Tensor, method: object, normalize: object, losses: object,
                   magnitude: object) -> Tuple[int, int, torch.Tensor, float]:
    """A device-solver ``moo_weights`` call (grams already checked as a float 3-D tensor):
    the method and normalize codes, the M losses (float64, on the grams' device; ones
    unless ``normalize="loss"``) and the magnitude."""
    check_choice("method", method, MOO_METHODS)
    check_choice("normalize", normalize, MGDA_NORMALIZATIONS)
    magnitude = check_positive("magnitude", magnitude)
    mm = grams.shape[1]
    if grams.shape[2] != mm:
        raise ValueError(f"grams must be G x M x M; got shape {tuple(grams.shape)}")
    if not 1 <= mm <= MOO_MAX_OBJECTIVES:
        raise ValueError(f"the {backend} backend's MOO solver takes 1 <= M <= {MOO_MAX_OBJECTIVES} objectives; got {mm} "
                         "(backend='reference' solves any M)")
    if normalize == "loss":
        if losses is None:
            raise ValueError('losses must be given when normalize="loss"')
        loss_t = torch.as_tensor(losses, dtype=torch.float64, device=grams.device).reshape(-1)
        if loss_t.numel() != mm:
            raise ValueError(f"losses must hold M={mm} values; got {loss_t.numel()}")
    else:
        loss_t = torch.ones(mm, dtype=torch.float64, device=grams.device)
    return MOO_METHOD_CODES[method], NORMALIZE_CODES[normalize], loss_t.contiguous(), magnitude


def check_pref_vector(pref: object, m: int | None = None) -> None:
    """None, or a list of non-negative finite numbers, one per objective (``m``, when known)."""
    if pref is None:
        return
    if not isinstance(pref, (list, tuple)) or not pref or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < float("inf") for x in pref):
        raise ValueError(f"pref_vector must be None or a list of numbers >= 0, one per objective; got {pref!r}")
    if m is not None and len(pref) != m:
        raise ValueError(f"pref_vector must hold one value per objective (M = {m}); got {len(pref)}")


def check_dual_cone_options(pref_vector: object, norm_eps: object, reg_eps: object, m: int | None = None) -> None:
    """UPGrad's and DualProj's options: the preference vector and two epsilons >= 0."""
    check_pref_vector(pref_vector, m)
    for name, value in (("norm_eps", norm_eps), ("reg_eps", reg_eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0; got {value!r}")


def dual_cone_device_refusal(num_objectives: int, reg_eps: float) -> str | None:
    """Why the device's UPGrad/DualProj solver cannot take this problem, or None (each
    caller names its own way to the host). It holds
    the Gram matrix in registers (M <= MOO_MAX_OBJECTIVES), and its start and iteration
    budget are argued for reg_eps >= DUAL_CONE_MIN_REG_EPS (docs/solver.md)."""
    if num_objectives > MOO_MAX_OBJECTIVES:
        return f"solves on the device for at most {MOO_MAX_OBJECTIVES} objectives, not M = {num_objectives}"
    if reg_eps < DUAL_CONE_MIN_REG_EPS:
        return f"solves on the device for reg_eps >= {DUAL_CONE_MIN_REG_EPS:g}; got reg_eps={reg_eps!r}"
    return None
