"""The checked Python side shared by the GPU backends (``triton``, ``cuda``).

Both backends take the same arguments, give the same errors and return the same
statistics; they differ only in how a kernel is launched. ``GpuOps`` holds that
common part and calls a backend's three launchers:

* ``bogc(g, mean_in, var_in, mean_out, var_out, raw, off, samples, alpha, commit,
  gamma, eps, confidence, weights) -> partials`` (``alpha``: ``(alpha, 1 - alpha)`` of
  ``reference.bogc.ema_weights``, floats or 0-dim device tensors); (``G x blocks x step_stats.width(M)``, ``stats.py``);
* ``combine(g, alpha, out, off, with_gram) -> partials`` (``G x blocks x [M*M | 1]``;
  ``alpha``/``out`` None for the Gram alone);
* ``moo(grams, method, normalize, losses, magnitude) -> weights`` (``G x M``).

Every reduction stays on the device: nothing here reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import _validation as V
from ..reference.bogc import ema_weights, finish_output, raw_output
from . import stats as step_stats

Tensor = torch.Tensor


@dataclass(frozen=True)
class GpuOps:
    name: str
    device_ok: Callable[[torch.device], bool]
    launch_bogc: Callable[..., Tensor]
    launch_combine: Callable[..., Tensor]
    launch_moo: Callable[..., Tensor]
    #: dtypes of the EMA state the kernels read and write (bfloat16: ``state_dtype=``)
    state_dtypes: Tuple[torch.dtype, ...] = (torch.float32,)
    #: objectives (rows) the BOGC and combination kernels take; the sample estimator's
    max_objectives: int = 64
    max_sample_objectives: int = 64

    # ----------------------------------------------------------------- checks
    def check(self, name: str, t: object, dim: int, contiguous: bool = True) -> Tensor:
        t = V.check_float_tensor(name, t, dim=dim)
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for backend='{self.name}' (call .contiguous() on it)")
        if not self.device_ok(t.device):
            raise ValueError(f"{name} must be a CUDA tensor for backend='{self.name}'; got one on {t.device}")
        limit = self.max_sample_objectives if name == "samples" else self.max_objectives
        if name in ("g", "samples") and t.shape[-2] > limit:
            raise ValueError(f"{name} has M={t.shape[-2]} objectives; backend='{self.name}' takes at most {limit} "
                             f"per segment{' with the sample estimator' if name == 'samples' else ''} (backend='cuda' takes 64)")
        return t

    def _state(self, name: str, t: object, dim: int) -> Tensor:
        t = self.check(name, t, dim)
        if t.dtype not in self.state_dtypes:
            raise TypeError(f"{name} must be {' or '.join(map(str, self.state_dtypes))} for backend='{self.name}'; got {t.dtype}")
        return t

    def _bogc(self, g: Tensor, states: Tuple[Tensor, Tensor, Tensor, Tensor], out: Tensor, group_offsets: Any,
              samples: int, alpha: Tuple[Any, Any], commit: Optional[Tensor],
              gamma: float, eps: float, confidence: str, weights: str, rescale: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
        gamma, eps = V.check_bogc_options(gamma, eps, confidence, weights)
        off = V.check_group_offsets(group_offsets, g.shape[-1])
        out = V.check_out(out, g, unrounded=True)
        raw = raw_output(out)
        parts = self.launch_bogc(g, *states, raw, off, samples, alpha, commit, gamma, eps, confidence, weights)
        st = step_stats.from_block_partials(parts, g.shape[-2], off.numel() - 1, g.shape[-1])
        return finish_output(out, raw, st, rescale), st

    # ----------------------------------------------------------- the functions
    def bogc_step(self, g, mean, var, step, *, beta=0.9, gamma=1.0, eps=1e-8, confidence="belief", weights="belief",
                  rescale=True, group_offsets=None, mean_out=None, var_out=None, out=None):
        g = self.check("g", g, 2)
        mean, var = self._state("mean", mean, 2), self._state("var", var, 2)
        V.check_same_shape(("g", "mean", "var"), (g, mean, var))
        step, beta = V.check_step(step), V.check_beta(beta)
        mean_out = torch.empty_like(mean) if mean_out is None else self._state("mean_out", mean_out, 2)
        var_out = torch.empty_like(var) if var_out is None else self._state("var_out", var_out, 2)
        res, st = self._bogc(g, (mean, var, mean_out, var_out), out, group_offsets, 0, ema_weights(step, beta), None,
                             gamma, eps, confidence, weights, rescale)
        return res, mean_out, var_out, st

    def bogc_step_gated(self, g, mean, var, commit, step, *, beta=0.9, gamma=1.0, eps=1e-8, confidence="belief",
                        weights="belief", rescale=True, group_offsets=None, out=None):
        """``bogc_step`` updating one slot of state ``mean``, ``var`` in place where
        ``commit`` (0-dim device tensor) is non-zero, with ``step`` a 0-dim device tensor
        too: no host synchronisation. The sync-free calibrator commits only a finite step
        (docs/spec.md §7)."""
        g = self.check("g", g, 2)
        mean, var = self._state("mean", mean, 2), self._state("var", var, 2)
        V.check_same_shape(("g", "mean", "var"), (g, mean, var))
        beta = V.check_beta(beta)
        alpha = tuple(a.reshape(()) for a in ema_weights(step.to(g.device), beta))
        return self._bogc(g, (mean, var, mean, var), out, group_offsets, 0, alpha, commit.reshape(()).to(torch.int64),
                          gamma, eps, confidence, weights, rescale)

    def bogc_sample_step(self, samples, *, gamma=1.0, eps=1e-8, confidence="belief", weights="belief",
                         rescale=True, group_offsets=None, out=None):
        samples = self.check("samples", samples, 3)
        if samples.shape[0] < 2:
            raise ValueError(f"samples needs S >= 2 along dim 0 for an unbiased variance; got S={samples.shape[0]}")
        unused = [torch.empty(0, dtype=torch.float32, device=samples.device) for _ in range(2)]
        return self._bogc(samples, (*unused, *unused), out, group_offsets, samples.shape[0], (1.0, 0.0), None,
                          gamma, eps, confidence, weights, rescale)

    def combine_and_gram(self, g, alpha, *, group_offsets=None, out=None, with_gram=True, _with_out=True):
        g = self.check("g", g, 2)
        V.check_float_tensor("alpha", alpha)
        mm, n = g.shape
        off = V.check_group_offsets(group_offsets, n)
        groups = off.numel() - 1
        want = (mm,) if group_offsets is None else (groups, mm)
        if tuple(alpha.shape) != want:
            raise ValueError(f"alpha must have shape {want}; got {tuple(alpha.shape)}")
        a = alpha.detach().to(g.device, torch.float64).reshape(groups, mm).contiguous()
        out = V.check_out(out, g) if _with_out else None  # the Gram alone writes no output
        tot = self.launch_combine(g, a if _with_out else None, out, off, with_gram).sum(dim=1)
        res = {"nonfinite": tot[:, -1].sum().to(torch.int64)}
        if with_gram:
            res["gram"] = tot[:, :-1].reshape(groups, mm, mm)
        return out, res

    def combine(self, g, alpha, *, group_offsets=None, out=None):
        return self.combine_and_gram(g, alpha, group_offsets=group_offsets, out=out, with_gram=False)[0]

    def gram(self, g, *, group_offsets=None):
        g = self.check("g", g, 2)
        groups = 1 if group_offsets is None else V.check_group_offsets(group_offsets, g.shape[1]).numel() - 1
        zeros = torch.zeros((g.shape[0],) if group_offsets is None else (groups, g.shape[0]), dtype=torch.float64, device=g.device)
        _, st = self.combine_and_gram(g, zeros, group_offsets=group_offsets, with_gram=True, _with_out=False)
        return st["gram"][0] if group_offsets is None else st["gram"]

    def moo_weights(self, grams, method, *, normalize="none", losses=None, magnitude=1.5):
        """The reference's ``moo_weights`` as one launch, with no host synchronisation.

        The device solver (docs/solver.md) is a predictor-corrector interior-point method
        that meets docs/spec.md §4's certificate within a proven iteration bound. Inputs are not
        checked for finiteness (that would synchronise): a non-finite Gram gives
        non-finite weights, which the sync-free step counts as a non-finite step.
        """
        grams = self.check("grams", grams, 3, contiguous=False)  # tiny: copied contiguous below
        codes = V.check_moo_call(self.name, grams, method, normalize, losses, magnitude)
        return self.launch_moo(grams.to(torch.float64).contiguous(), *codes)
