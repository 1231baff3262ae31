"""mmgrad's compiled kernels as ``torch.library`` operators, namespace ``mmgrad``.

Each operator has a schema that names the tensors it writes (``Tensor(a!)``), a CPU
kernel (the C++/OpenMP extension ``mmgrad._C``), and a fake implementation that gives
the shape and dtype of what it returns. So ``torch.compile`` traces through the cpu
backend's calls instead of breaking its graph at an opaque extension function, and
``torch.library.opcheck`` checks every operator (tests/test_library.py).

The step kernels return the float64 statistics vector of ``csrc/cpu/common.h``'s
``StatsLayout`` (``G*M*M`` Gram, 6 scalars, ``M`` share sums), or, for ``gram`` and
``combine``, ``G*M*M`` Gram plus the non-finite count. ``mmgrad.kernels.cpu`` checks the
arguments and parses the statistics; call the kernels through ``mmgrad.ops``.

>>> import torch, mmgrad
>>> g = torch.randn(2, 5)
>>> torch.ops.mmgrad.gram(g, torch.tensor([0, 5])).shape   # [G*M*M Gram | non-finite count]
torch.Size([5])
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from ..backends import cpu_extension
from ..reference.bogc import ema_weights

Tensor = torch.Tensor
_BOGC_OPTIONS = "float gamma, float eps, int confidence, int weights"
#: Each operator's schema; the CPU kernel is the extension function of the same name. The
#: EMA steps take ``step`` and ``beta``, not the weights derived from them: under
#: torch.compile a float computed from a traced step guards on its rounding, and failed.
SCHEMAS: Dict[str, str] = {
    "bogc_step": "(Tensor g, Tensor mean_in, Tensor var_in, Tensor(a!) mean_out, Tensor(b!) var_out, Tensor(c!) out, "
                 f"Tensor group_offsets, int step, float beta, {_BOGC_OPTIONS}) -> Tensor",
    "bogc_sample_step": f"(Tensor samples, Tensor(a!) out, Tensor group_offsets, {_BOGC_OPTIONS}) -> Tensor",
    "bogc_from_moments": "(Tensor mu, Tensor var, Tensor(a!) out, Tensor(b!) fused_u, Tensor(c!) fused_b_pos, "
                         f"Tensor(d!) fused_b_neg, {_BOGC_OPTIONS}) -> Tensor",
    "ema_moments": "(Tensor g, Tensor mean_in, Tensor var_in, Tensor(a!) mean_out, Tensor(b!) var_out, int step, "
                   "float beta) -> ()",
    "opinions": "(Tensor mu, Tensor var, Tensor(a!) lam, Tensor(b!) b_pos, Tensor(c!) b_neg, Tensor(d!) u, float gamma, "
                "float eps) -> ()",
    "ds_combine": "(Tensor b_pos, Tensor b_neg, Tensor u, Tensor(a!) out_b_pos, Tensor(b!) out_b_neg, "
                  "Tensor(c!) out_u) -> ()",
    "gram": "(Tensor g, Tensor group_offsets) -> Tensor",
    "combine": "(Tensor g, Tensor alpha, Tensor group_offsets, Tensor(a!) out, bool with_gram) -> Tensor",
}


def _step_stats(m: int, groups: int, like: Tensor) -> Tensor:
    return like.new_empty(groups * m * m + 6 + m, dtype=torch.float64)


def _gram_stats(m: int, groups: int, like: Tensor) -> Tensor:
    return like.new_empty(groups * m * m + 1, dtype=torch.float64)


def _groups(group_offsets: Tensor) -> int:
    return group_offsets.shape[0] - 1


FAKES: Dict[str, Callable[..., object]] = {
    "bogc_step": lambda g, *a: _step_stats(g.shape[0], _groups(a[5]), g),
    "bogc_sample_step": lambda s, out, off, *a: _step_stats(s.shape[1], _groups(off), s),
    "bogc_from_moments": lambda mu, *a: _step_stats(mu.shape[0], 1, mu),
    "ema_moments": lambda *a: None,
    "opinions": lambda *a: None,
    "ds_combine": lambda *a: None,
    "gram": lambda g, off: _gram_stats(g.shape[0], _groups(off), g),
    "combine": lambda g, alpha, off, out, with_gram: _gram_stats(g.shape[0], _groups(off), g),
}


#: Where the EMA operators take ``step`` (``beta`` follows); the extension takes the
#: weights ``(alpha, 1 - alpha)`` of ``reference.bogc.ema_weights`` there instead.
_EMA_STEP_AT = {"bogc_step": 7, "ema_moments": 5}


def extension_args(name: str, args: tuple) -> tuple:
    """Operator ``name``'s arguments as the extension function of that name takes them."""
    at = _EMA_STEP_AT.get(name)
    return args if at is None else (*args[:at], *ema_weights(args[at], args[at + 1]), *args[at + 2:])


def _cpu_kernel(name: str) -> Callable[..., object]:
    def kernel(*args):
        ext = cpu_extension()
        if ext is None:
            raise RuntimeError(f"mmgrad::{name} needs the compiled extension mmgrad._C; see mmgrad.backends()")
        return getattr(ext, name)(*extension_args(name, args))

    kernel.__name__ = name
    return kernel


def _register() -> None:
    for name, schema in SCHEMAS.items():
        qualname = f"mmgrad::{name}"
        try:
            torch.library.define(qualname, schema)
        except RuntimeError:  # defined already (this module imported again): keep the first
            continue
        torch.library.impl(qualname, "cpu")(_cpu_kernel(name))
        torch.library.register_fake(qualname)(FAKES[name])


_register()
