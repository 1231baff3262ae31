"""BOGC (docs/spec.md §3): per-coordinate opinions fused by Dempster-Shafer, one pass per segment.

Each segment's rows go through the backend's fused step with its own ``|R|`` objectives
(an unreached objective is a vacuous opinion, so leaving it out changes nothing); the
norm matching of §3.7 then scales the whole output once, from the summed norms. The EMA
state is one slot of ``mean, var`` per reached row (docs/spec.md §7; the bias-corrected mean and
the variance, ``reference.bogc.ema_moments``), updated in place: the step
reads G once first to know it is finite (host mode), or gates every state write on the
device flag (sync-free mode).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from .. import _validation as V
from ..collect import GRADS
from ..reference.bogc import match_norm_, state_from_moments
from ._base import Method, StepContext, StepResult, all_ranks_ok, all_reduce_sum, decide, locate_nonfinite

STATE_DTYPES = (torch.float32, torch.bfloat16)
#: the layout buffers of the EMA state, one slot: the bias-corrected mean and the variance
STATE = ("mean", "var")


class BOGC(Method):
    name = "bogc"
    family = "bogc"
    kernels = ("all_finite", "bogc_step", "bogc_sample_step")
    defaults = {"estimator": "ema", "beta": 0.9, "gamma": 1.0, "eps": 1e-8, "confidence": "belief",
                "weights": "belief", "rescale": True, "state_dtype": torch.float32}

    def __init__(self, options: Dict[str, Any], layout) -> None:
        super().__init__(options, layout)
        self.takes_samples = options["estimator"] == "sample"
        self.row_state = () if self.takes_samples else STATE  # the sample estimator keeps no state
        # float64 parameters keep float64 state, as the kernels compute in their dtype
        self.state_dtype = torch.float64 if layout.dtype == torch.float64 else options["state_dtype"]
        if layout.dtype == torch.float64 and options["state_dtype"] != torch.float32:
            raise TypeError("state_dtype: float64 parameters keep float64 EMA state; bfloat16 state is for "
                            "float32/bfloat16/float16 parameters")
        if not self.takes_samples:
            for name in STATE:
                layout.add_buffer(name, self.state_dtype)

    @classmethod
    def check_options(cls, o: Dict[str, Any]) -> None:
        V.check_choice("estimator", o["estimator"], ("ema", "sample"))
        V.check_beta(o["beta"])
        V.check_bogc_options(o["gamma"], o["eps"], o["confidence"], o["weights"])
        if o["state_dtype"] not in STATE_DTYPES:
            raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16; got {o['state_dtype']!r}")

    def step(self, ctx: StepContext) -> StepResult:
        o, lay = self.options, ctx.layout
        segments = lay.reached
        ok = torch.ones((), dtype=torch.bool, device=lay.device)
        if not self.takes_samples:
            # one read of G before any state is written: a non-finite step leaves the state intact
            ok = all_ranks_ok(ctx, ctx.ops.all_finite([seg.buffers[GRADS] for seg in segments]).to(lay.device))
            if decide(ctx, ok) is False:
                return StepResult(False, lambda: locate_nonfinite(lay))
        kw = dict(gamma=o["gamma"], eps=o["eps"], confidence=o["confidence"], weights=o["weights"], rescale=False)
        m = lay.num_objectives
        zero = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=lay.device)  # noqa: E731
        grams, share_sum = zero(lay.num_groups, m, m), zero(m)
        sum_sq, out_sq, share_count, nonfinite, u_sum, conflict_sum = (zero() for _ in range(6))
        for seg in lay.segments:
            raw = lay.raw[seg.lo : seg.hi]
            if not seg.rows:  # no objective reaches: a vacuous opinion, zero output
                raw.zero_()
                u_sum = u_sum + seg.numel
                continue
            if not seg.numel:  # a sharded rank may hold no element of a small segment
                continue
            g, off = seg.buffers[GRADS], seg.group_offsets
            if self.takes_samples:
                _, st = ctx.ops.bogc_sample_step(g, group_offsets=off, out=raw, **kw)
            elif ctx.sync_free:
                _, st = ctx.ops.bogc_step_gated(g, seg.buffers["mean"], seg.buffers["var"], ok, ctx.steps + 1,
                                                beta=o["beta"], group_offsets=off, out=raw, **kw)
            else:
                mean, var = seg.buffers["mean"], seg.buffers["var"]
                _, _, _, st = ctx.ops.bogc_step(g, mean, var, ctx.steps + 1, beta=o["beta"], group_offsets=off,
                                                mean_out=mean, var_out=var, out=raw, **kw)
            st = {k: t.to(lay.device) if isinstance(t, torch.Tensor) else t for k, t in st.items()}
            lay.scatter_gram(seg, st["gram"], grams)
            rows = torch.tensor(seg.rows, device=lay.device)
            share_sum = share_sum.index_add(0, rows, st["share_sum"].to(torch.float64))
            sum_sq, out_sq = sum_sq + st["sum_sq"], out_sq + st["out_sq"]
            share_count = share_count + st["share_count"]
            nonfinite = nonfinite + st["nonfinite"]
            u_sum = u_sum + st["uncertainty"] * seg.numel
            conflict_sum = conflict_sum + st["conflict"] * seg.numel
        # sharded (docs/spec.md §8): the per-coordinate work was local; these sums are global
        grams, share_sum, sum_sq, out_sq, share_count, nonfinite, u_sum, conflict_sum = all_reduce_sum(
            ctx, [grams, share_sum, sum_sq, out_sq, share_count, nonfinite, u_sum, conflict_sum])
        if self.takes_samples:  # no state to protect: the step's own count decides
            ok = nonfinite == 0
            if decide(ctx, ok) is False:
                return StepResult(False, lambda: locate_nonfinite(lay))
        if o["rescale"]:
            match_norm_(lay.raw, {"sum_sq": sum_sq, "out_sq": out_sq})
        if lay.raw is not lay.out:
            lay.out.copy_(lay.raw)
        if not ctx.sync_free and not bool(torch.isfinite(out_sq)):  # finite inputs must give a finite output
            raise RuntimeError("mmgrad: the calibrated gradient is not finite although every input was; please report this")
        n = max(lay.total_elements, 1)
        diagnostics = {"weights": share_sum / share_count.clamp_min(1.0), "uncertainty": u_sum / n,
                       "conflict": conflict_sum / n, "gram": grams}
        return StepResult(ok if ctx.sync_free else True, diagnostics=diagnostics)

    def state_dict(self) -> Dict[str, Any]:
        if self.takes_samples:
            return {}
        return {name: [t.clone() for t in self.layout.buffers(name)] for name in STATE}

    def check_state(self, state: Dict[str, Any], segments: List[Tuple[int, int]]) -> None:
        if self.takes_samples:
            return
        names = ("m", "v") if "mean" not in state and "m" in state else STATE  # mmgrad <= 0.2: raw moments
        for name in names:
            saved = state.get(name)
            if not isinstance(saved, (list, tuple)):
                raise ValueError(f"state has no {name!r}: the EMA estimator's state, per reached segment")
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in saved]
            if shapes != [tuple(s) for s in segments]:
                raise ValueError(f"state {name!r} holds segments {shapes}; the saved reach lays out {segments}")
            if name in STATE and any(t.dtype != self.options["state_dtype"] for t in saved):
                raise ValueError(f"state {name!r} is {saved[0].dtype}; this calibrator's state_dtype is "
                                 f"{self.options['state_dtype']}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.takes_samples:
            return
        if "mean" not in state and "m" in state:  # mmgrad <= 0.2 saved the raw EMA moments m, v
            steps, beta = int(state["step_count"]), self.options["beta"]
            pairs = [state_from_moments(m, v, steps, beta) for m, v in zip(state["m"], state["v"])]
            state = {"mean": [p[0] for p in pairs], "var": [p[1] for p in pairs]}
        for name in STATE:
            mine, saved = self.layout.buffers(name), state[name]
            if len(saved) != len(mine) or any(a.shape != b.shape for a, b in zip(mine, saved)):
                raise ValueError(f"state {name!r} does not match this calibrator's layout (segments {[tuple(t.shape) for t in mine]})")
            for a, b in zip(mine, saved):
                a.copy_(b)

    def state_bytes(self) -> int:
        if self.takes_samples:
            return 0
        return sum(t.numel() * t.element_size() for name in STATE for t in self.layout.buffers(name))
