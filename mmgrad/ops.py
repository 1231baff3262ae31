"""The dispatcher: docs/spec.md §6's pure functions, each with a ``backend=`` argument.

``backend="auto"`` picks the fastest available backend for the tensors' device
(``cpu`` kernels on CPU tensors; ``cuda``/``triton`` on GPU tensors) and falls back to
``reference``. Every backend computes the same function as ``mmgrad.reference``, with its
own code: a function a backend has no kernel for (``implements``) runs on the reference
under ``"auto"`` and is refused, with ``NotImplementedError``, when that backend is named.

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
from typing import Any, Callable, Dict

import torch

from . import _validation as V
from . import reference
from ._constants import DUAL_CONE_DEFAULTS, DUAL_CONE_METHODS, MOO_METHODS
from .backends import resolve

__all__ = [
    "all_finite",
    "backend_module",
    "implements",
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
    """The module of ``backend`` (resolved for ``device``). It computes the functions in
    its ``__all__`` with its own kernels (``implements``); the reference has them all."""
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


def implements(module: ModuleType, name: str) -> bool:
    """Whether a backend module computes ``name`` with its own code (not the reference's)."""
    return module is reference or name in getattr(module, "__all__", ())


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
        module = backend_module(backend, _device_of(args, kwargs))
        if not implements(module, name):
            if backend != "auto":  # never the reference under a kernel backend's name
                raise NotImplementedError(f"backend {module.NAME!r} has no kernel for {name}; it computes "
                                          f"{', '.join(module.__all__)}. backend='reference' (or 'auto') runs "
                                          f"{name} in plain PyTorch on any device")
            module = reference
        return getattr(module, name)(*args, **kwargs)

    sig = inspect.signature(ref)
    extra = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str)
    params = list(sig.parameters.values())
    if params and params[-1].kind == inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, extra)
    else:
        params.append(extra)
    dispatch.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    dispatch.__doc__ = (f"{ref.__doc__}\n\n    ``backend``: 'auto' (default), 'reference', 'cpu', 'triton' or 'cuda'; "
                        "'auto' runs the reference where the device's backend has no kernel for it.\n")
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
# The M x M solves: mgda_weights, mmpareto_weights and mimo_weights are the reference's
# host code; moo_weights is mmgrad_math.h's solver on cpu and cuda, and its Triton mirror,
# for mgda and mmpareto, and the host solvers of the other Gramian baselines.
mgda_weights = _dispatching("mgda_weights")
mmpareto_weights = _dispatching("mmpareto_weights")
mimo_weights = _dispatching("mimo_weights")
_device_moo_weights = _dispatching("moo_weights")


def _device_takes_dual_cone(num_objectives: int, options: Dict[str, Any]) -> bool:
    full = {**DUAL_CONE_DEFAULTS, **options}
    V.check_dual_cone_options(full["pref_vector"], full["norm_eps"], full["reg_eps"])
    return V.dual_cone_device_refusal(num_objectives, full["reg_eps"]) is None


@functools.wraps(_device_moo_weights)
def moo_weights(grams: torch.Tensor, method: str, *, backend: str = "auto", **options: Any) -> torch.Tensor:
    if method in MOO_METHODS:
        unknown = sorted(set(options) - {"normalize", "losses", "magnitude"})
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method={method!r}; it takes normalize, losses and magnitude")
        return _device_moo_weights(grams, method, backend=backend, **options)
    device = grams.device if isinstance(grams, torch.Tensor) else torch.device("cpu")
    if method in DUAL_CONE_METHODS:
        unknown = sorted(set(options) - {"pref_vector", "norm_eps", "reg_eps"})
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method={method!r}; it takes pref_vector, norm_eps and reg_eps")
        module = backend_module(backend, device)
        if (implements(module, "dual_cone_weights") and isinstance(grams, torch.Tensor) and grams.dim() == 3
                and _device_takes_dual_cone(grams.shape[1], options)):
            return module.dual_cone_weights(grams, method, **options)  # on the device on triton
    resolve(backend, device)  # a valid name
    return reference.moo_weights(grams, method, **options)  # the other backends solve these on the host
