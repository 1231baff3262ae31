"""``FusedCalibrator``: per-objective gradients into one flat M x N buffer, calibrated in one pass.

>>> import torch, mmgrad
>>> audio, video, head = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.nn.Linear(8, 3)
>>> params = [*audio.parameters(), *video.parameters(), *head.parameters()]
>>> opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
>>> cal = mmgrad.FusedCalibrator(
...     [{"params": audio.parameters()}, {"params": video.parameters()}],
...     num_objectives=3, method="bogc")
>>> cal = cal.attach(opt)     # returns the calibrator
>>> xa, xv, y = torch.randn(16, 6), torch.randn(16, 5), torch.randint(0, 3, (16,))
>>> za, zv = audio(xa), video(xv)
>>> ce = torch.nn.functional.cross_entropy
>>> losses = [ce(head(torch.cat([za, zv], 1)), y), ce(za[:, :3], y), ce(zv[:, :3], y)]
>>> cal.backward(losses)     # per-objective gradients -> the M x N buffer
>>> opt.step(); opt.zero_grad()   # the pre-hook calibrates, writes .grad, then SGD steps
>>> sorted(cal.diagnostics)
['conflict', 'gram', 'uncertainty', 'weights']
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _validation as V
from .distributed import GradientAverager, resolve_group
from ._sync_free import DeviceStep, all_finite
from .ops import backend_module
from .reference.moo import mimo_weights

Tensor = torch.Tensor
ParamsArg = Union[Iterable[Tensor], Iterable[Dict[str, Any]]]

METHODS = ("bogc", "mgda", "mmpareto", "mimo", "sum", "mean")
BACKWARD_MODES = ("loop", "batched")

# Options each method accepts, with defaults (SPEC.md §3-4).
_COMMON = {"skip_nonfinite": False, "backward_mode": "loop", "sync_free": False}
_METHOD_OPTIONS: Dict[str, Dict[str, Any]] = {
    "bogc": {
        "estimator": "ema",
        "beta": 0.9,
        "gamma": 1.0,
        "eps": 1e-8,
        "confidence": "belief",
        "weights": "belief",
        "rescale": True,
    },
    "mgda": {"normalize": "none", "lagged": False},
    "mmpareto": {"magnitude": 1.5, "lagged": False},
    "mimo": {"rho": 1.0, "tau": 1.0},
    "sum": {},
    "mean": {},
}


class NonFiniteGradientError(FloatingPointError):
    """A per-objective gradient held inf or NaN; the calibrator's state was left untouched."""


# Phrases of the errors DDP's reducer raises when a second backward reaches it.
_DDP_ERRORS = ("DistributedDataParallel", "DDP", "mark a variable ready", "finished reduction")

# parameter -> weakref to the live calibrator that owns it: two calibrators writing one
# parameter's .grad would silently overwrite each other.
_OWNERS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


class FusedCalibrator:
    """Calibrates the gradients of the given parameters from M per-objective gradients.

    Args:
        params: parameters, or parameter groups as an optimizer takes them
            (``[{"params": enc_a.parameters()}, ...]``). MOO weights are solved per group.
            Parameters with ``requires_grad=False`` are skipped.
        num_objectives: M, the number of losses ``backward`` receives.
        method: ``"bogc"``, ``"mgda"``, ``"mmpareto"``, ``"mimo"``, ``"sum"`` or ``"mean"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ...; see ``mmgrad.backends()``.
        process_group: ranks to average gradients over. ``None`` (default): the world
            when ``torch.distributed`` is initialised with more than one rank; ``False``:
            never. See README, "Distributed training".
        bucket_bytes: size of one asynchronous all-reduce (default 25 MiB, as DDP).
        **options: the method's options (README, "Options"); ``skip_nonfinite`` and
            ``backward_mode`` (``"loop"``: one backward per objective, accumulating into
            views of the buffer; ``"batched"``: one vmapped ``autograd.grad``).

    Parameters not handed to the calibrator receive the plain summed gradient.
    """

    def __init__(
        self,
        params: ParamsArg,
        num_objectives: int,
        method: str = "bogc",
        backend: str = "auto",
        process_group: Any = None,
        bucket_bytes: int = 25 * 1024 * 1024,
        **options: Any,
    ) -> None:
        V.check_choice("method", method, METHODS)
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int):
            raise TypeError(f"num_objectives must be an int; got {type(num_objectives).__name__}")
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1; got {num_objectives}")
        self.method = method
        self.num_objectives = num_objectives
        self.options = self._parse_options(method, options)
        self.groups = self._parse_params(params)
        self.params: List[Tensor] = [p for grp in self.groups for p in grp]
        self._claim_params()
        group = resolve_group(process_group)
        self._averager = GradientAverager(group, bucket_bytes) if group is not None else None
        self._scaler: Any = None  # the GradScaler handed to backward(), for this step
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        self.backend = backend
        self._ops = backend_module(backend, self.device)
        self.backend_name = self._ops.__name__.rsplit(".", 1)[-1]
        self._device_step: Optional[DeviceStep] = None
        if self.options["sync_free"]:
            if not hasattr(self._ops, "bogc_step_slots"):
                raise ValueError(f"sync_free=True needs a backend that solves on the device ('triton'); "
                                 f"backend {self.backend_name!r} reads the step's result on the host")
            if not self.options["skip_nonfinite"]:
                raise ValueError("sync_free=True needs skip_nonfinite=True: raising on a non-finite gradient "
                                 "needs the host to look at it, which is the synchronisation sync_free avoids")

        sizes = [p.numel() for p in self.params]
        self.num_elements = sum(sizes)
        self._param_offsets = [0]
        for s in sizes:
            self._param_offsets.append(self._param_offsets[-1] + s)
        group_sizes = [sum(p.numel() for p in grp) for grp in self.groups]
        self.group_offsets = torch.tensor([0, *torch.tensor(group_sizes).cumsum(0).tolist()], dtype=torch.int64)

        m, n = num_objectives, self.num_elements
        # "sum" is one plain backward: autograd writes .grad, no buffer or output here.
        self._out = None if method == "sum" else torch.zeros(n, device=self.device, dtype=self.dtype)
        self._out_views = [] if self._out is None else self._views(self._out)
        self._grads: Optional[Tensor] = None  # M x N, or S x M x N for the sample estimator
        self._grad_views: List[List[Tensor]] = []
        self._state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        if self._uses_ema:
            # Two slots: the kernel reads one and writes the other, so a step with
            # non-finite gradients leaves the committed state bit-identical.
            self._m = torch.zeros(2, m, n, device=self.device, dtype=self._state_dtype)
            self._v = torch.zeros_like(self._m)
        self._slot = 0
        self.step_count = 0
        self._prev_alpha: Optional[Tensor] = None
        self._loss_values: Optional[Tensor] = None
        # "idle" -> backward() -> "pending" -> step() -> "calibrated" | "skipped" -> optimizer step -> "idle"
        self._phase = "idle"
        self._hook = None
        self._post_hook = None
        self.diagnostics: Dict[str, Tensor] = {}
        if self.options["sync_free"]:
            self._device_step = DeviceStep(self)

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def _parse_options(method: str, options: Dict[str, Any]) -> Dict[str, Any]:
        allowed = {**_COMMON, **_METHOD_OPTIONS[method]}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method={method!r}; it takes {sorted(allowed)}")
        opts = {**allowed, **options}
        V.check_choice("backward_mode", opts["backward_mode"], BACKWARD_MODES)
        if method == "bogc":
            V.check_choice("estimator", opts["estimator"], ("ema", "sample"))
            V.check_beta(opts["beta"])
            V.check_bogc_options(opts["gamma"], opts["eps"], opts["confidence"], opts["weights"])
        elif method == "mgda":
            V.check_choice("normalize", opts["normalize"], V.MGDA_NORMALIZATIONS)
        elif method == "mmpareto":
            V.check_positive("magnitude", opts["magnitude"])
        elif method == "mimo":
            V.check_positive("rho", opts["rho"])
            V.check_positive("tau", opts["tau"])
        for flag in ("skip_nonfinite", "rescale", "lagged", "sync_free"):
            if flag in opts and not isinstance(opts[flag], bool):
                raise TypeError(f"{flag} must be a bool; got {type(opts[flag]).__name__}")
        return opts

    @staticmethod
    def _parse_params(params: ParamsArg) -> List[List[Tensor]]:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or of dicts, not a single tensor")
        items = list(params)
        if not items:
            raise ValueError("params is empty: give the parameters to calibrate")
        raw = [list(d["params"]) if isinstance(d, dict) else None for d in items]
        if all(r is None for r in raw):
            raw_groups = [items]
        elif all(r is not None for r in raw):
            for d in items:
                extra = sorted(set(d) - {"params"})
                if extra:
                    raise ValueError(f"parameter groups take only the key 'params'; got {extra}")
            raw_groups = raw  # type: ignore[assignment]
        else:
            raise TypeError("params must be all tensors or all dicts with 'params', not a mix")
        seen, groups = set(), []
        for gi, grp in enumerate(raw_groups):
            kept = []
            for p in grp:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"params (group {gi}) must hold tensors; got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError(f"params: a parameter of shape {tuple(p.shape)} appears twice")
                seen.add(id(p))
                if not p.is_leaf:
                    raise ValueError(f"params: a tensor of shape {tuple(p.shape)} is not a leaf (not a parameter)")
                if p.requires_grad:  # frozen parameters take no part
                    kept.append(p)
            if kept:
                groups.append(kept)
        if not groups:
            raise ValueError("params: every parameter has requires_grad=False; nothing to calibrate")
        flat = [p for g in groups for p in g]
        devices = {p.device for p in flat}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device; got {sorted(map(str, devices))} (use one calibrator per device)")
        dtypes = {p.dtype for p in flat}
        if len(dtypes) > 1:
            raise TypeError(f"params must share one dtype; got {sorted(map(str, dtypes))} (use one calibrator per dtype)")
        if flat[0].dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"params must be floating point; got {flat[0].dtype}")
        sparse = next((p for p in flat if p.layout != torch.strided), None)
        if sparse is not None:
            raise TypeError(f"params must be dense (strided) tensors; got a {sparse.layout} parameter of shape {tuple(sparse.shape)}")
        return groups

    def _claim_params(self) -> None:
        for p in self.params:
            owner = _OWNERS.get(p)
            if owner is not None and owner() is not None:
                raise ValueError(
                    f"params: a parameter of shape {tuple(p.shape)} is already calibrated by {owner()!r}; "
                    "two calibrators would overwrite each other's .grad (give each parameter to one calibrator)")
        ref = weakref.ref(self)
        for p in self.params:
            _OWNERS[p] = ref

    @property
    def _uses_ema(self) -> bool:
        return self.method == "bogc" and self.options["estimator"] == "ema"

    def _views(self, flat: Tensor) -> List[Tensor]:
        return [flat[a:b].view_as(p) for p, a, b in zip(self.params, self._param_offsets[:-1], self._param_offsets[1:])]

    # --------------------------------------------------------------- backward
    def backward(self, losses: Union[Sequence[Tensor], Tensor], scaler: Any = None) -> None:
        """Fill row m of the buffer with d loss_m / d params (each calibrated parameter).

        ``losses`` holds the M scalar losses (``[fusion, modality_1, ...]``); for
        ``estimator="sample"``, an ``S x M`` nested sequence or tensor (S >= 2
        micro-batches). Parameters not handed to the calibrator accumulate the sum.

        ``scaler``: a ``torch.amp.GradScaler``. The losses are scaled here, and the
        calibration runs at once on the unscaled gradients, because ``scaler.step``
        inspects ``.grad`` before ``optimizer.step()`` (README, "Mixed precision").
        """
        rows = self._check_losses(losses)
        self._scaler = self._check_scaler(scaler)
        if self._scaler is not None and self._device_step is not None:
            raise ValueError("scaler: a GradScaler reads its scale on the host; it does not combine with sync_free=True")
        # the leaves outside the calibrator: averaged across ranks, and given the summed
        # gradient by the batched backward (the loop's backward passes reach them anyway)
        batched = self.method != "sum" and self.options["backward_mode"] == "batched"
        others = self._other_leaves(rows) if self._averager is not None or batched else []
        self._loss_values = self._average_losses(rows)
        if self._scaler is not None:
            rows = [self._scaler.scale(r) for r in rows]
        if self.method == "sum":
            # Exactly plain joint training: one backward of the summed loss.
            for p in self.params:
                p.grad = None
            torch.stack([r.reshape(()) for r in rows]).sum().backward()
            if self._averager is not None:
                self._averager.launch_averaged(p.grad for p in [*self.params, *others] if p.grad is not None)
            self._phase = "pending"
            self._calibrate_now_for_scaler()
            return
        self._ensure_grad_buffer(len(rows))
        if batched:
            self._backward_batched(rows, others)
        else:
            self._backward_loop(rows)
        if self._averager is not None:
            if batched:
                self._averager.launch(self._grads.view(-1))
            self._averager.launch_averaged(p.grad for p in others if p.grad is not None)
        for p in self.params:
            p.grad = None  # nothing stale is visible until the calibrated gradient is written
        self._phase = "pending"
        self._calibrate_now_for_scaler()

    def _calibrate_now_for_scaler(self) -> None:
        if self._scaler is not None:
            self.step()  # the scaler must see the calibrated (scaled) gradient, or inf to skip

    @staticmethod
    def _check_scaler(scaler: Any) -> Any:
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler; got {type(scaler).__name__}")
        return scaler if scaler.is_enabled() else None

    def _average_losses(self, rows: List[Tensor]) -> Tensor:
        values = torch.stack([r.detach().reshape(()) for r in rows]).to(torch.float64)
        if self._averager is not None:  # MIMO and loss-normalised MGDA see the global losses
            torch.distributed.all_reduce(values, group=self._averager.group)
            values /= self._averager.world_size
        return values if self._device_step is not None else values.cpu()

    def _check_losses(self, losses: Union[Sequence[Tensor], Tensor]) -> List[Tensor]:
        sample = self.method == "bogc" and self.options["estimator"] == "sample"
        if isinstance(losses, torch.Tensor):
            want_dim = 2 if sample else 1
            if losses.dim() != want_dim:
                raise ValueError(f"losses must be a {want_dim}-D tensor of {'S x M' if sample else 'M'} losses; got shape {tuple(losses.shape)}")
            nested = [list(row.unbind(0)) for row in losses.unbind(0)] if sample else [list(losses.unbind(0))]
        else:
            if not isinstance(losses, (list, tuple)):
                raise TypeError(f"losses must be a list/tuple of scalar tensors or a tensor; got {type(losses).__name__}")
            nested = [list(r) for r in losses] if sample else [list(losses)]
        if sample and len(nested) < 2:
            raise ValueError(f"losses must hold S >= 2 micro-batches for estimator='sample'; got {len(nested)}")
        rows: List[Tensor] = []
        for s, row in enumerate(nested):
            if len(row) != self.num_objectives:
                raise ValueError(f"losses must hold num_objectives={self.num_objectives} losses{f' per micro-batch (row {s})' if sample else ''}; got {len(row)}")
            for i, loss in enumerate(row):
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"losses[{i}] must be a tensor; got {type(loss).__name__}")
                if loss.numel() != 1:
                    raise ValueError(f"losses[{i}] must be a scalar; got shape {tuple(loss.shape)}")
                if not loss.requires_grad:
                    raise ValueError(f"losses[{i}] does not require grad (computed under no_grad, or from frozen parameters only)")
                rows.append(loss)
        return rows

    def _ensure_grad_buffer(self, num_rows: int) -> None:
        m, n = self.num_objectives, self.num_elements
        sample = self.method == "bogc" and self.options["estimator"] == "sample"
        shape = (num_rows // m, m, n) if sample else (m, n)
        if self._grads is None or tuple(self._grads.shape) != shape:
            self._grads = torch.zeros(shape, device=self.device, dtype=self.dtype)
            flat = self._grads.view(-1, n)
            self._grad_views = [self._views(flat[r]) for r in range(flat.shape[0])]

    def _backward_loop(self, rows: List[Tensor]) -> None:
        assert self._grads is not None
        self._grads.zero_()
        last = len(rows) - 1
        flat = self._grads.view(len(rows), -1)
        for r, loss in enumerate(rows):
            # autograd adds into an existing .grad in place, so the row fills with no copy;
            # an objective that does not reach a parameter leaves zeros there.
            for p, view in zip(self.params, self._grad_views[r]):
                p.grad = view
            try:
                loss.backward(retain_graph=r < last)
            except RuntimeError as err:
                if r > 0 and any(k in str(err) for k in _DDP_ERRORS):
                    raise RuntimeError(
                        "a second backward through a DistributedDataParallel model failed: DDP reduces once per "
                        "forward. Run the forward and cal.backward(losses) under `with ddp_model.no_sync():` and let "
                        "the calibrator average the gradients (README, \"Distributed training\")") from err
                raise
            if self._averager is not None:  # row r is final: its all-reduce overlaps the next backward
                self._averager.launch(flat[r])

    def _backward_batched(self, rows: List[Tensor], others: List[Tensor]) -> None:
        assert self._grads is not None
        stacked = torch.stack([r.reshape(()) for r in rows])
        eye = torch.eye(len(rows), device=stacked.device, dtype=stacked.dtype)
        try:
            grads = torch.autograd.grad(stacked, self.params, grad_outputs=eye, is_grads_batched=True, allow_unused=True, retain_graph=True)
        except NotImplementedError as err:
            if "Sparse" not in str(err):
                raise
            raise TypeError("backward_mode='batched' cannot produce sparse gradients (nn.Embedding(sparse=True)): "
                            "use backward_mode='loop', which densifies them into the buffer") from err
        flat = self._grads.view(len(rows), -1)
        for p, g, a, b in zip(self.params, grads, self._param_offsets[:-1], self._param_offsets[1:]):
            if g is None:
                flat[:, a:b].zero_()
            else:
                flat[:, a:b].copy_(g.reshape(len(rows), -1))
        if others:  # parameters outside the calibrator still get the summed gradient
            stacked.sum().backward(inputs=others)

    def _other_leaves(self, roots: List[Tensor]) -> List[Tensor]:
        """Leaves the losses reach that are not calibrated here (they get the summed gradient)."""
        mine, found, stack, seen = {id(p) for p in self.params}, [], [r.grad_fn for r in roots], set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None and id(var) not in mine:
                found.append(var)
            stack.extend(nf for nf, _ in fn.next_functions)
        return found

    # ------------------------------------------------------------------ step
    def attach(self, optimizer: torch.optim.Optimizer) -> "FusedCalibrator":
        """Calibrate in a step pre-hook of ``optimizer`` (before every ``optimizer.step()``)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if self._device_step is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise TypeError("optimizer: sync_free=True skips non-finite steps through optimizer.found_inf, which only "
                            "fused optimizers read (torch.optim.Adam/AdamW/SGD with fused=True)")
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise TypeError("optimizer: SparseAdam takes sparse gradients only, and calibrated gradients are dense "
                            "(use Adam/AdamW for the calibrated parameters)")
        if self._hook is not None:
            raise RuntimeError("this calibrator is already attached to an optimizer; call detach() first")
        self._optimizer = optimizer
        self._hook = optimizer.register_step_pre_hook(self._pre_step_hook)
        if self._device_step is not None:
            self._post_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: opt.__dict__.pop("found_inf", None))
        return self

    def detach(self) -> None:
        """Remove the optimizer hook that ``attach`` registered."""
        for hook in (self._hook, self._post_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._post_hook = None

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._phase == "idle":
            raise RuntimeError("optimizer.step() was called without FusedCalibrator.backward(losses) since the last step")
        if self._phase == "pending":  # else the user called step() already (e.g. to clip)
            self.step()
        if self._device_step is not None:  # the fused optimizer skips on the device flag
            optimizer.found_inf = self._device_step.found_inf  # type: ignore[attr-defined]
        if self._phase == "skipped":
            for group in optimizer.param_groups:  # skip the whole step, as GradScaler does
                for p in group["params"]:
                    p.grad = None
        self._phase = "idle"

    @torch.no_grad()
    def step(self) -> bool:
        """Calibrate now and write ``.grad`` of the calibrated parameters.

        Returns False (and writes no gradient) when the step was skipped for non-finite
        gradients under ``skip_nonfinite=True``; raises ``NonFiniteGradientError`` for
        them otherwise. The calibrator's state is untouched in both cases.
        """
        if self._phase != "pending":
            raise RuntimeError("FusedCalibrator.step() needs backward(losses) first (once per step)")
        if self._averager is not None:
            self._averager.wait()
        scale = self._scaler.get_scale() if self._scaler is not None else 1.0  # no scaler when sync-free
        world = self._averager.world_size if self._averager is not None else 1
        if self.method != "sum" and scale * world != 1.0:  # one pass: average over ranks and unscale together
            self._grads.mul_(1.0 / (scale * world))
        if self._device_step is not None:
            self._device_step.run()
            self._phase = "calibrated"
            return True  # whether it was finite is self.found_inf, on the device
        if self.method == "sum":
            self.diagnostics = {"weights": torch.full((self.num_objectives,), 1.0 / self.num_objectives, dtype=torch.float64)}
            ok = True if self._scaler is not None else self._check_sum_finite()  # the scaler checks its own
            self.step_count += int(ok)
        else:
            ok = self._step_bogc() if self.method == "bogc" else self._step_weighted()
            if ok:
                if scale != 1.0:  # the scaler unscales .grad again in scaler.step
                    self._out.mul_(scale)
                self._write_out_grads()
        self._phase = "calibrated" if ok else "skipped"
        return ok

    def _hand_inf_to_scaler(self) -> bool:
        """Overflow under a GradScaler: leave our state, make the scaler skip and back off."""
        self._out.fill_(float("inf"))
        self._write_out_grads()
        self.diagnostics = {"skipped": torch.tensor(True)}
        return False

    def _check_sum_finite(self) -> bool:
        # one read per gradient and one host read in all: the max-norm is inf/NaN iff an entry is
        grads = [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        if bool(all_finite([g for _, g in grads])):
            return True
        for i, g in grads:
            if not bool(torch.isfinite(g).all()):
                return self._nonfinite(f"the summed gradient of parameter {i} (shape {tuple(self.params[i].shape)}) is not finite")
        return True

    def _nonfinite(self, where: str) -> bool:
        if self._scaler is not None:  # overflow is routine under a scaler: it decides
            return self._hand_inf_to_scaler()
        if self.options["skip_nonfinite"]:
            for p in self.params:
                p.grad = None
            self.diagnostics = {"skipped": torch.tensor(True)}
            return False
        raise NonFiniteGradientError(f"{where}; the calibrator's state is unchanged (pass skip_nonfinite=True to skip such steps)")

    def _locate_nonfinite(self) -> str:
        assert self._grads is not None
        flat = self._grads.reshape(-1, self.num_elements)
        bad = (~torch.isfinite(flat)).nonzero()[0].tolist()
        row, d = bad
        param = next(i for i in range(len(self.params)) if self._param_offsets[i + 1] > d)
        obj = row % self.num_objectives
        return f"the gradient of objective {obj} (losses[{obj}]) for parameter {param} (shape {tuple(self.params[param].shape)}) is not finite"

    def _bogc_kwargs(self) -> Dict[str, Any]:
        """The step options every backend's bogc_step / bogc_sample_step takes."""
        o = self.options
        return dict(gamma=o["gamma"], eps=o["eps"], confidence=o["confidence"], weights=o["weights"],
                    rescale=o["rescale"], group_offsets=self.group_offsets, out=self._out)

    def _set_bogc_diagnostics(self, stats: Dict[str, Tensor]) -> None:
        self.diagnostics = {k: stats[k] for k in ("weights", "uncertainty", "conflict", "gram")}

    def _set_weighted_diagnostics(self, alpha: Tensor, grams: Optional[Tensor]) -> None:
        share = alpha / alpha.sum(dim=1, keepdim=True).clamp_min(1e-300)
        self.diagnostics = {"weights": share.mean(dim=0), "group_weights": alpha}
        if grams is not None:
            self.diagnostics["gram"] = grams

    def _write_out_grads(self) -> None:
        for p, view in zip(self.params, self._out_views):
            p.grad = view

    def _step_bogc(self) -> bool:
        o, kw = self.options, self._bogc_kwargs()
        if o["estimator"] == "sample":
            _, stats = self._ops.bogc_sample_step(self._grads, **kw)
            if int(stats["nonfinite"]) > 0:
                return self._nonfinite(self._locate_nonfinite())
            self._check_output(stats)
        else:
            cur, nxt, t = self._slot, 1 - self._slot, self.step_count + 1
            _, _, _, stats = self._ops.bogc_step(self._grads, self._m[cur], self._v[cur], t, beta=o["beta"], m_out=self._m[nxt], v_out=self._v[nxt], **kw)
            if int(stats["nonfinite"]) > 0:
                return self._nonfinite(self._locate_nonfinite())
            self._check_output(stats)
            self._slot = nxt
        self.step_count += 1
        self._set_bogc_diagnostics(stats)
        return True

    @staticmethod
    def _check_output(stats: Dict[str, Tensor]) -> None:
        if not bool(torch.isfinite(stats["out_sq"])):  # finite inputs must give a finite output
            raise RuntimeError("mmgrad: the calibrated gradient is not finite although every input was; please report this")

    def _solve(self, grams: Tensor) -> Tensor:
        o = self.options
        if self.method == "mgda":
            loss = self._loss_values if o["normalize"] == "loss" else None
            return self._ops.moo_weights(grams, "mgda", normalize=o["normalize"], losses=loss)
        return self._ops.moo_weights(grams, "mmpareto", magnitude=o["magnitude"])

    def _step_weighted(self) -> bool:
        o, m, groups = self.options, self.num_objectives, self.group_offsets.numel() - 1
        grams = None
        if self.method == "mimo" and not bool(torch.isfinite(self._loss_values).all()):
            bad = int((~torch.isfinite(self._loss_values)).nonzero()[0, 0])
            return self._nonfinite(f"the loss of objective {bad} (losses[{bad}]) is not finite")
        if self.method in ("mimo", "mean"):
            w = mimo_weights(self._loss_values, o["rho"], o["tau"]) if self.method == "mimo" else torch.full((m,), 1.0 / m, dtype=torch.float64)
            alpha = w.to(torch.float64).expand(groups, m).contiguous()
        elif o["lagged"] and self._prev_alpha is not None:
            alpha = self._prev_alpha  # one read: combine with last step's weights, Gram for the next
        else:
            grams = self._ops.gram(self._grads, group_offsets=self.group_offsets)
            if not bool(torch.isfinite(grams).all()):  # K_mm = sum g^2 is inf/NaN iff row m is
                return self._nonfinite(self._locate_nonfinite())
            alpha = self._solve(grams)
        lagged = self.method in ("mgda", "mmpareto") and o["lagged"]
        _, stats = self._ops.combine_and_gram(self._grads, alpha, group_offsets=self.group_offsets, out=self._out, with_gram=lagged)
        if int(stats["nonfinite"]) > 0:
            return self._nonfinite(self._locate_nonfinite())
        if lagged:
            grams = stats["gram"]
            self._prev_alpha = self._solve(grams)
        self.step_count += 1
        self._set_weighted_diagnostics(alpha, grams)
        return True

    @property
    def found_inf(self) -> Optional[Tensor]:
        """With ``sync_free=True``: a 0-dim float tensor on the device, 1.0 when the last step
        had non-finite gradients (and was skipped by calibrator and fused optimizer), else
        0.0. None in the host-synchronising mode, where ``step()`` returns that as a bool."""
        return None if self._device_step is None else self._device_step.found_inf

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes this calibrator holds: the per-objective buffer, the EMA state (two slots,
        so a non-finite step can leave the committed one untouched) and the output."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()
        state = size(self._m) + size(self._v) if self._uses_ema else 0
        return {"grad_buffer": size(self._grads), "ema_state": state, "output": size(self._out)}

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Method, options, step count, EMA moments (committed slot) and lagged weights."""
        state: Dict[str, Any] = {
            "method": self.method,
            "num_objectives": self.num_objectives,
            "num_elements": self.num_elements,
            "group_offsets": self.group_offsets.clone(),
            "options": dict(self.options),
            "step_count": self.step_count,
        }
        slot, prev = self._slot, self._prev_alpha
        if self._device_step is not None:  # a checkpoint may synchronise
            state["step_count"] = int(self._device_step.steps)
            slot, prev = int(self._device_step.slot), self._device_step.prev_alpha
        if self._uses_ema:
            state["m"] = self._m[slot].clone()
            state["v"] = self._v[slot].clone()
        if prev is not None:
            state["prev_alpha"] = prev.clone()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict`` of a calibrator built with the same parameters and method."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        for key, mine in (("method", self.method), ("num_objectives", self.num_objectives), ("num_elements", self.num_elements)):
            if state.get(key) != mine:
                raise ValueError(f"state {key}={state.get(key)!r} does not match this calibrator's {mine!r}")
        if not torch.equal(torch.as_tensor(state["group_offsets"]), self.group_offsets):
            raise ValueError("state group_offsets do not match this calibrator's parameter groups")
        self.options = self._parse_options(self.method, {k: v for k, v in state["options"].items()})
        self.step_count = int(state["step_count"])
        if self._uses_ema:
            self._slot = 0
            self._m[0].copy_(state["m"])
            self._v[0].copy_(state["v"])
        self._prev_alpha = state["prev_alpha"].clone() if "prev_alpha" in state else None
        if self._device_step is not None:
            self._device_step.slot.zero_()
            self._device_step.steps.fill_(self.step_count)
            self._device_step.prev_alpha = None if self._prev_alpha is None else self._prev_alpha.to(self.device)
        self._phase = "idle"

    def __repr__(self) -> str:
        return (f"FusedCalibrator(method={self.method!r}, num_objectives={self.num_objectives}, "
                f"groups={len(self.groups)}, num_elements={self.num_elements}, backend={self.backend_name!r})")
