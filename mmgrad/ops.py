"""The dispatcher: SPEC.md §6's pure functions, each with a ``backend=`` argument.

``backend="auto"`` picks the fastest available backend for the tensors' device
(``cpu`` kernels on CPU tensors; ``cuda``/``triton`` on GPU tensors) and falls back to
``reference``. Every backend computes the same function as ``mmgrad.reference``.

>>> import torch, mmgrad
>>> g = torch.randn(3, 1000)
>>> k = mmgrad.ops.gram(g)                      # fastest available backend
>>> torch.allclose(k, mmgrad.ops.gram(g, backend="reference"))
True
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType
from typing import Any, Callable

import torch

from . import reference
from .backends import resolve

__all__ = [
    "all_finite",
    "backend_module",
    "bogc_from_moments",
    "bogc_sample_step",
    "bogc_step",
    "combine",
    "combine_and_gram",
    "ds_combine",
    "ema_moments",
    "gram",
    "mgda_weights",
    "mimo_weights",
    "mmpareto_weights",
    "moo_weights",
    "opinions",
]


def backend_module(backend: str, device: torch.device) -> ModuleType:
    """The module implementing ``backend`` (resolved for ``device``); every one has the same functions."""
    name = resolve(backend, device)
    if name == "cpu":
        from .kernels import cpu

        return cpu
    if name == "cuda":
        from .kernels import cuda

        return cuda
    if name == "triton":
        from .kernels import triton_kernels

        return triton_kernels
    return reference


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return torch.device("cpu")


def _dispatching(name: str) -> Callable[..., Any]:
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def dispatch(*args: Any, backend: str = "auto", **kwargs: Any) -> Any:
        return getattr(backend_module(backend, _device_of(args, kwargs)), name)(*args, **kwargs)

    sig = inspect.signature(ref)
    extra = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str)
    params = list(sig.parameters.values())
    if params and params[-1].kind == inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, extra)
    else:
        params.append(extra)
    dispatch.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    dispatch.__doc__ = f"{ref.__doc__}\n\n    ``backend``: 'auto' (default), 'reference', 'cpu', 'triton' or 'cuda'.\n"
    return dispatch


all_finite = _dispatching("all_finite")
ema_moments = _dispatching("ema_moments")
opinions = _dispatching("opinions")
ds_combine = _dispatching("ds_combine")
bogc_from_moments = _dispatching("bogc_from_moments")
bogc_step = _dispatching("bogc_step")
bogc_sample_step = _dispatching("bogc_sample_step")
gram = _dispatching("gram")
combine = _dispatching("combine")
combine_and_gram = _dispatching("combine_and_gram")
# The M x M solves: host code on the reference/cpu backends; moo_weights runs as one
# device kernel on the triton backend.
mgda_weights = _dispatching("mgda_weights")
mmpareto_weights = _dispatching("mmpareto_weights")
mimo_weights = _dispatching("mimo_weights")
moo_weights = _dispatching("moo_weights")
