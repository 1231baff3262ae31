"""``FusedCalibrator``: the public facade over the layout, the collection, the methods and distribution.

It owns the step's phases (backward, which calibrates and writes ``.grad`` -> optimizer
step), the non-finite policy, the optimizer hook and checkpoints; everything else is
one part's job:

* ``mmgrad.params`` — the parameters given, their groups and names;
* ``mmgrad.layout.Layout`` — segments by reach, their rows, the output and its views;
* ``mmgrad.collect.GradientCollector`` — reach from the graph, backward passes, accumulation;
* ``mmgrad.methods`` — one module per method family, each with its options and step;
* ``mmgrad.distributed.GradientAverager`` — bucketed, overlapped averaging across ranks;
* ``mmgrad.sharding.RowSharder`` / ``mmgrad.fsdp`` — rows sharded across ranks (docs/spec.md §8).

>>> import torch, mmgrad
>>> audio, video, head = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.nn.Linear(8, 3)
>>> params = [*audio.parameters(), *video.parameters(), *head.parameters()]
>>> opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
>>> cal = mmgrad.FusedCalibrator(
...     [{"params": audio.named_parameters(prefix="audio")},
...      {"params": video.named_parameters(prefix="video")}],
...     num_objectives=3, method="bogc")
>>> cal = cal.attach(opt)     # returns the calibrator
>>> xa, xv, y = torch.randn(16, 6), torch.randn(16, 5), torch.randint(0, 3, (16,))
>>> za, zv = audio(xa), video(xv)
>>> ce = torch.nn.functional.cross_entropy
>>> losses = [ce(head(torch.cat([za, zv], 1)), y), ce(za[:, :3], y), ce(zv[:, :3], y)]
>>> cal.backward(losses)     # per-objective gradients -> rows -> calibrated .grad
>>> audio.weight.grad.shape  # the calibrated gradient, ready to clip or log
torch.Size([4, 6])
>>> norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
>>> opt.step(); opt.zero_grad()
>>> sorted(cal.diagnostics)
['conflict', 'gram', 'uncertainty', 'weights']
>>> [seg.rows for seg in cal.layout.segments]   # audio: fused + its own loss; video likewise
[(0, 1), (0, 2)]
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _validation as V
from ._version import __version__
from .collect import BACKWARD_MODES, GRADS, GradientCollector, graph_reach
from .distributed import GradientAverager, resolve_group, union_reach
from .fsdp import FSDPGradients, fsdp_sharding
from .layout import Layout, split_views
from .methods import METHODS, StepContext
from .ops import backend_module
from .params import ParamsArg, label, parse_params
from .sharding import RowSharder

Tensor = torch.Tensor

_COMMON = {"skip_nonfinite": False, "backward_mode": "loop", "sync_free": False}
_FLAGS = ("skip_nonfinite", "rescale", "lagged", "sync_free")

# parameter -> weakref to the live calibrator that owns it: two calibrators writing one
# parameter's .grad would silently overwrite each other.
_OWNERS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


class NonFiniteGradientError(FloatingPointError):
    """A per-objective gradient held inf or NaN; the calibrator's state was left untouched."""


class FusedCalibrator:
    """Calibrates the gradients of the given parameters from M per-objective gradients.

    Args:
        params: parameters, or parameter groups as an optimizer takes them
            (``[{"params": enc_a.parameters()}, ...]``), each as tensors or as
            ``named_parameters()`` pairs (then errors and warnings name them). MOO weights
            are solved per group. Parameters with ``requires_grad=False`` are left out
            (unfreezing one later is warned about: it then trains uncalibrated). A
            parameter shared by two branches belongs in one group; its reach (which
            losses lead to it) decides its rows.
        num_objectives: M, the number of losses ``backward`` receives.
        method: a name of ``mmgrad.methods.METHODS``: ``"bogc"``, ``"mgda"``,
            ``"mmpareto"``, ``"mimo"``, ``"ogm"``, ``"sum"``, ``"mean"``, ``"upgrad"``,
            ``"dualproj"``, ``"pcgrad"``, ``"cagrad"``, ``"imtl_g"``, ``"aligned_mtl"`` or
            ``"nash_mtl"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ...; see ``mmgrad.backends()``.
        process_group: ranks to average gradients over. ``None`` (default): the world
            when ``torch.distributed`` is initialised with more than one rank; ``False``:
            never. See docs/guide.md, "Distributed training".
        bucket_bytes: size of one asynchronous all-reduce (default 25 MiB, as DDP).
        shard: hold the rows and the EMA state of this rank's ``1/world`` slice only
            (ZeRO-2, docs/spec.md §8): rows are reduce-scattered, the calibrated slices
            all-gathered into ``.grad``. Parameters of ``fully_shard``-ed (FSDP2) modules
            are sharded that way whatever ``shard`` says. See docs/guide.md, "Which distributed
            setup to pick".
        **options: the method's options (docs/methods.md, "Methods and options"), ``skip_nonfinite``,
            ``sync_free`` and ``backward_mode`` (``"loop"``: one backward per objective,
            accumulating into views of the rows; ``"batched"``: one vmapped ``autograd.grad``).

    ``backward(losses)`` leaves the calibrated gradient in ``.grad``, as ``loss.backward()``
    leaves its own: clip, log or unscale between it and ``optimizer.step()`` as usual.
    Parameters not handed to the calibrator receive the plain summed gradient. Without
    ``zero_grad`` between steps, every parameter accumulates, calibrated or not. Rows are
    kept only where an objective reaches a parameter (``self.layout``, docs/spec.md §2).
    """

    def __init__(
        self,
        params: ParamsArg,
        num_objectives: int,
        method: str = "bogc",
        backend: str = "auto",
        process_group: Any = None,
        bucket_bytes: int = 25 * 1024 * 1024,
        shard: bool = False,
        **options: Any,
    ) -> None:
        V.check_choice("method", method, tuple(METHODS))
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int):
            raise TypeError(f"num_objectives must be an int; got {type(num_objectives).__name__}")
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1; got {num_objectives}")
        self.method = method
        self.num_objectives = num_objectives
        self.options = self._parse_options(method, options)
        chosen = parse_params(params)
        self.groups, self.params, self.names = chosen.groups, chosen.params, chosen.names
        self._frozen = chosen.frozen  # watched: unfreezing one later is warned about
        self._warned: set = set()
        self._claim_params()
        if not isinstance(shard, bool):
            raise TypeError(f"shard must be a bool; got {type(shard).__name__}")
        self._setup_distribution(process_group, bucket_bytes, shard)
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.backend = backend
        self._ops = backend_module(backend, self.device)
        self.backend_name: str = self._ops.NAME
        why_not = METHODS[method].unsupported(self._ops, num_objectives)
        if why_not:
            raise ValueError(f"method={method!r} cannot run on backend {self.backend_name!r}: {why_not}")
        self.sync_free = self.options["sync_free"]
        if self.sync_free:
            why_not = METHODS[method].sync_free_refusal(self.options, num_objectives)
            if why_not:
                raise ValueError(f"sync_free=True: method {method!r} {why_not}; with sync_free=False the host solves it")
            if not getattr(self._ops, "SYNC_FREE", False):
                raise ValueError(f"sync_free=True needs a backend that solves on the device ('triton'); "
                                 f"backend {self.backend_name!r} reads the step's result on the host")
            if not self.options["skip_nonfinite"]:
                raise ValueError("sync_free=True needs skip_nonfinite=True: raising on a non-finite gradient "
                                 "needs the host to look at it, which is the synchronisation sync_free avoids")
        self.num_elements = sum(p.numel() for p in self.params)
        sizes = [sum(p.numel() for p in grp) for grp in self.groups]
        self.group_offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)

        self.layout = Layout(self.groups, num_objectives, shards=self._shards, names=self.names,
                             output=METHODS[method].uses_rows)
        method_options = {k: v for k, v in self.options.items() if k not in _COMMON}
        self._method = METHODS[method](method_options, self.layout)
        self._collector = GradientCollector(self.layout, self.options["backward_mode"], self._averager,
                                            self._sharder, self._fsdp)
        # shard=True: .grad of the whole parameters, gathered from every rank's calibrated slice
        self._gathered = (torch.zeros(sum(p.numel() for p in self.params), device=self.device, dtype=self.dtype)
                          if self._sharder is not None and self._method.uses_rows else None)
        self._steps: Union[int, Tensor] = torch.zeros((), dtype=torch.int64, device=self.device) if self.sync_free else 0
        self._found_inf = torch.zeros((), dtype=torch.float32, device=self.device) if self.sync_free else None
        self._scaler: Any = None  # the GradScaler handed to backward(), for this step
        self._scaler_mark: Any = None  # its (scale, growth tracker) when it calibrated: update() changes them
        self._loss_sum: Optional[Tensor] = None
        self._score_sum: Optional[Tensor] = None
        self._others: Dict[int, Tensor] = {}  # leaves outside the calibrator the losses reach
        self._reducing = False  # this step's all-reduces are launched, not yet waited for
        self._accumulating = False
        # "idle" -> backward() -> "pending" -> step() -> "calibrated" | "skipped" -> optimizer step -> "idle"
        self._phase = "idle"
        self._hook = self._post_hook = None
        self._prior: Dict[int, Tensor] = {}  # .grad left from earlier steps, by parameter index
        self._diagnostics: Dict[str, Tensor] = {}

    # ----------------------------------------------------------------- set-up
    def _setup_distribution(self, process_group: Any, bucket_bytes: int, shard: bool) -> None:
        """Who averages what across ranks: the averager (rows when unsharded, the leaves
        outside the calibrator), the sharder (shard=True) or FSDP2 itself (DTensor params)."""
        self._sharder: Optional[RowSharder] = None
        self._fsdp: Optional[FSDPGradients] = None
        self._shards = None
        self._shard_of: Optional[Dict[str, int]] = None  # {"rank", "world"} when sharded
        fsdp = fsdp_sharding(self.params)
        if fsdp is not None:
            if self.options["backward_mode"] != "loop":
                raise ValueError("backward_mode: FSDP2 reduce-scatters gradients in backward(), which "
                                 "backward_mode='batched' (autograd.grad) never calls; use 'loop'")
            if process_group is not None and process_group is not False:
                raise ValueError("process_group: FSDP2 parameters are averaged by FSDP2 over their device mesh; "
                                 "leave process_group unset")
            self._averager = None
            self._group = fsdp.group if fsdp.world > 1 else None  # losses and the step's global sums
            self._fsdp, self._shards = FSDPGradients(self.params), fsdp.rows
            self._stats_group = self._group
            self._shard_of = {"rank": fsdp.rank, "world": fsdp.world}
            return
        group = resolve_group(process_group)
        self._averager = GradientAverager(group, bucket_bytes) if group is not None else None
        self._group = group
        self._stats_group = None
        if shard and group is not None and METHODS[self.method].uses_rows:
            self._sharder = RowSharder(group, self.params, bucket_bytes)
            self._shards, self._stats_group = self._sharder.rows, group
            self._shard_of = {"rank": self._sharder.rank, "world": self._sharder.world}

    @staticmethod
    def _parse_options(method: str, options: Dict[str, Any]) -> Dict[str, Any]:
        cls = METHODS[method]
        allowed = {**_COMMON, **cls.defaults}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method={method!r}; it takes {sorted(allowed)}")
        opts = {**allowed, **options}
        V.check_choice("backward_mode", opts["backward_mode"], BACKWARD_MODES)
        for flag in _FLAGS:  # a flag of some method; another may take a number by the same name (cagrad's rescale)
            if flag in opts and isinstance(allowed[flag], bool) and not isinstance(opts[flag], bool):
                raise TypeError(f"{flag} must be a bool; got {type(opts[flag]).__name__}")
        cls.check_options(opts)
        return opts

    def _claim_params(self) -> None:
        for i, p in enumerate(self.params):
            owner = _OWNERS.get(p)
            if owner is not None and owner() is not None:
                raise ValueError(
                    f"params: {label(p, self.names[i], i)} is already calibrated by {owner()!r}; "
                    "two calibrators would overwrite each other's .grad (give each parameter to one calibrator)")
        ref = weakref.ref(self)
        for p in self.params:
            _OWNERS[p] = ref

    @property
    def diagnostics(self) -> Dict[str, Tensor]:
        """What the last calibration measured, as tensors (on the device; read them when
        logging, which synchronises). Every method: ``weights`` (M, the objectives' mean
        share of the calibrated gradient). MOO methods (``mgda``, ``mmpareto``, ``mimo``,
        ``mean``, ``ogm``): ``group_weights`` (G x M, per parameter group); ``mgda`` and
        ``mmpareto`` also ``gram`` (G x M x M, float64). ``bogc``: ``uncertainty`` and
        ``conflict`` (Dempster-Shafer's, averaged over elements) and ``gram``. ``ogm``:
        ``ogm_coefficients``, ``ogm_ratio`` and ``noise_std``. A skipped step:
        ``{"skipped": tensor(True)}``. Empty before the first step."""
        return self._diagnostics

    @property
    def step_count(self) -> int:
        """Committed (finite) steps so far."""
        return int(self._steps)

    # --------------------------------------------------------------- backward
    @contextlib.contextmanager
    def accumulate(self) -> Iterator["FusedCalibrator"]:
        """Backward calls inside add to the rows and defer the work of the step's last
        micro-batch: the averaging across ranks, and the calibration under a GradScaler.

        ``backward`` called k times before a step already sums each objective's rows
        (docs/spec.md §7); wrap the first k - 1 in this, as one wraps them in DDP's ``no_sync()``,
        to communicate once per step, and to accumulate under a ``GradScaler`` at all.
        """
        previous, self._accumulating = self._accumulating, True
        try:
            yield self
        finally:
            self._accumulating = previous

    def backward(self, losses: Union[Sequence[Tensor], Tensor], scaler: Any = None,
                 scores: Optional[Union[Sequence[float], Tensor]] = None) -> None:
        """Add d loss_m / d params to the rows of objective m (each calibrated parameter it reaches).

        ``losses`` holds the M scalar losses (``[fusion, modality_1, ...]``); for
        ``estimator="sample"``, an ``S x M`` nested sequence or tensor (S >= 2
        micro-batches). Parameters not handed to the calibrator accumulate the sum.
        Called again before the optimizer step, it accumulates (docs/spec.md §7).

        ``scaler``: a ``torch.amp.GradScaler``. The losses are scaled here, and the
        calibration runs at once on the unscaled gradients, because ``scaler.step``
        inspects ``.grad`` before ``optimizer.step()`` (docs/guide.md, "Mixed precision");
        to accumulate under a scaler, run the first micro-batches in ``accumulate()``.

        ``scores``: per-view confidences for the methods that read them (``ogm``: the
        summed true-class probabilities, ``mmgrad.methods.ogm_scores``), summed over
        accumulated calls; a method that reads none refuses them.
        """
        rows = self._check_losses(losses)
        scores = self._check_scores(scores)
        scaler = self._check_scaler(scaler)
        if scaler is not None and self.sync_free:
            raise ValueError("scaler: a GradScaler reads its scale on the host; it does not combine with sync_free=True")
        if self._phase in ("calibrated", "skipped") and self._scaler is not None and self._scaler_mark != _mark(self._scaler):
            self._phase = "idle"  # scaler.step skipped optimizer.step() (an inf), then scaler.update(): the step is over
        if self._phase in ("calibrated", "skipped") and self._hook is not None:
            # the last backward() calibrated .grad and no optimizer step came since: adding to
            # the rows now would calibrate twice and advance the method's state twice
            raise RuntimeError("backward() again before optimizer.step(): backward() calibrates the step and writes "
                               ".grad, so to accumulate micro-batches run all but the last in `with cal.accumulate():` "
                               "(docs/guide.md, \"Gradient accumulation\")")
        accumulate = self._phase == "pending"
        if accumulate and (scaler is None) != (self._scaler is None):
            raise ValueError("scaler: pass the same GradScaler (or none) to every backward() of an accumulated step")
        self._scaler = scaler
        samples = len(rows) // self.num_objectives
        reach, others = graph_reach(rows, self.params, self.num_objectives)
        if self._averager is not None and self._method.uses_rows:  # every rank must lay out the same rows
            reach = union_reach(reach, self.num_objectives, self._averager.group, self.device)
        if not accumulate:
            self._others = {}
            self._keep_prior_grads()
            self._watch_requires_grad()
        self._others.update((id(t), t) for t in others)
        self._record_losses(rows, samples, fresh=not accumulate)
        self._record_scores(scores, fresh=not accumulate)
        if scaler is not None:
            rows = [scaler.scale(r) for r in rows]
        reduce = self._averager is not None and not self._accumulating
        if self._method.uses_rows:
            self.layout.extend(reach)
            self._collect(rows, samples, accumulate, others, reduce)
        else:  # autograd adds the sum into .grad, accumulating as plain PyTorch does
            torch.stack([r.reshape(()) for r in rows]).sum().backward()
        if reduce:
            self._launch_reduction()
        self._phase = "pending"
        if not self._accumulating:
            # .grad holds the calibrated gradient when backward() returns, as after loss.backward():
            # clipping, logging and scaler.unscale_ between backward and step see it
            self.step()

    def _keep_prior_grads(self) -> None:
        """What ``.grad`` of the calibrated parameters holds as a step begins (no
        ``zero_grad`` since the last step): the collection reuses ``.grad`` and the output
        is overwritten in place, so it is copied aside and added back by ``_write_grads``,
        and the calibrated parameters accumulate across steps as the others do."""
        self._prior = {}
        if self._method.uses_rows:
            self._prior = {i: p.grad.detach().clone() for i, p in enumerate(self.params) if p.grad is not None}

    def _watch_requires_grad(self) -> None:
        """Warn once about parameters whose ``requires_grad`` changed since construction: one
        unfrozen since has no rows and trains on the plain summed gradient; one frozen since
        gets no ``.grad`` (so no optimizer moves it). The layout is fixed by the parameters
        given, as an optimizer's groups are: build a new calibrator to change them."""
        thawed = [label(p, name) for name, p in self._frozen if p.requires_grad and id(p) not in self._warned]
        frozen = [self.layout.label(i) for i, p in enumerate(self.params) if not p.requires_grad and id(p) not in self._warned]
        for what, names in (("were frozen (requires_grad=False) when the calibrator was built and now require "
                             "grad: they train on the plain summed gradient, outside calibration", thawed),
                            ("were calibrated and are now frozen (requires_grad=False): they get no .grad", frozen)):
            if names:
                warnings.warn(f"params: {', '.join(names)} {what}. Build a new FusedCalibrator over the parameters "
                              "to train.", stacklevel=3)
        self._warned.update(id(p) for _, p in self._frozen if p.requires_grad)
        self._warned.update(id(p) for p in self.params if not p.requires_grad)

    def _collect(self, rows: List[Tensor], samples: int, accumulate: bool, others: List[Tensor], reduce: bool) -> None:
        takes = self._method.takes_samples
        if accumulate and self.layout.has_buffer(GRADS):
            lead = self.layout.segments[0].buffers[GRADS].shape[:-2] if self.layout.segments else ()
            if tuple(lead) != ((samples,) if takes else ()):
                raise ValueError(f"losses: every accumulated backward() of a step must hold the same number of "
                                 f"micro-batches; got {samples} after {tuple(lead)}")
        self._collector.ensure_buffer(samples if takes else 1)
        batched = self.options["backward_mode"] == "batched"
        self._collector.collect(rows, samples if takes else 1, accumulate, others if batched else [], reduce)

    def _launch_reduction(self) -> None:
        """After the collector launched the rows' all-reduce: the summed gradients of ``sum``
        and of the leaves outside the calibrator, averaged in place by ``wait``."""
        summed = [*self._others.values()] if self._method.uses_rows else [*self.params, *self._others.values()]
        self._averager.launch_averaged(p.grad for p in summed if p.grad is not None)
        self._reducing = True

    def _record_losses(self, rows: List[Tensor], samples: int, fresh: bool) -> None:
        """The loss values MIMO and ``normalize="loss"`` read: per objective, the mean over
        the sample estimator's micro-batches, summed over accumulated calls, averaged over ranks."""
        values = torch.stack([r.detach().reshape(()) for r in rows]).to(torch.float64)
        values = values.view(samples, self.num_objectives).mean(0)
        if self._group is not None:  # MIMO and loss-normalised MGDA see the global losses
            torch.distributed.all_reduce(values, group=self._group)
            values /= torch.distributed.get_world_size(self._group)
        self._loss_sum = values if fresh or self._loss_sum is None else self._loss_sum + values

    def _check_scores(self, scores: Any) -> Optional[Tensor]:
        if scores is None:
            if self._phase == "pending" and self._score_sum is not None:
                raise ValueError("scores: give them to every backward() of an accumulated step, or to none")
            return None
        if not self._method.takes_scores:
            raise TypeError(f"scores: method {self.method!r} reads no scores (ogm does)")
        t = torch.as_tensor(scores).detach()
        if t.dim() != 1 or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"scores must be a 1-D sequence of real numbers; got shape {tuple(t.shape)}, {t.dtype}")
        want = self._method.num_scores
        if t.numel() != want:
            raise ValueError(f"scores must hold {want} values (one per view of method {self.method!r}); got {t.numel()}")
        if self._phase == "pending" and self._score_sum is None:
            raise ValueError("scores: give them to every backward() of an accumulated step, or to none")
        return t.to(device=self.device, dtype=torch.float64)

    def _record_scores(self, scores: Optional[Tensor], fresh: bool) -> None:
        """The scores a method reads: summed over accumulated calls and over ranks, as the
        official scores are sums over the batch's samples."""
        if scores is not None and self._group is not None:
            torch.distributed.all_reduce(scores, group=self._group)
        self._score_sum = scores if fresh or scores is None else self._score_sum + scores

    @property
    def _loss_values(self) -> Optional[Tensor]:
        """Summed over accumulated calls, as one backward of the summed losses would see
        them (docs/spec.md, decision 21)."""
        if self._loss_sum is None:
            return None
        return self._loss_sum if self.sync_free else self._loss_sum.cpu()

    @staticmethod
    def _check_scaler(scaler: Any) -> Any:
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler; got {type(scaler).__name__}")
        return scaler if scaler.is_enabled() else None

    def _check_losses(self, losses: Union[Sequence[Tensor], Tensor]) -> List[Tensor]:
        sample = self._method.takes_samples
        if isinstance(losses, torch.Tensor):
            want_dim = 2 if sample else 1
            if losses.dim() != want_dim:
                raise ValueError(f"losses must be a {want_dim}-D tensor of {'S x M' if sample else 'M'} losses; got shape {tuple(losses.shape)}")
            nested = [list(row.unbind(0)) for row in losses.unbind(0)] if sample else [list(losses.unbind(0))]
        else:
            if not isinstance(losses, (list, tuple)):
                raise TypeError(f"losses must be a list/tuple of scalar tensors or a tensor; got {type(losses).__name__}")
            if sample and any(not isinstance(r, (list, tuple)) and not (isinstance(r, torch.Tensor) and r.dim() == 1)
                              for r in losses):
                raise ValueError(f"losses must be S x M for estimator='sample': S >= 2 micro-batches, each a list of "
                                 f"the num_objectives={self.num_objectives} losses (or an S x M tensor); got a flat "
                                 f"sequence of {len(losses)}")
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

    # ------------------------------------------------------------------ step
    def attach(self, optimizer: torch.optim.Optimizer) -> "FusedCalibrator":
        """Hook ``optimizer.step()``: it marks the end of a step (so a second ``backward``
        before it is refused rather than calibrated twice), skips a step whose gradients
        were not finite under ``skip_nonfinite=True``, hands a fused optimizer the
        ``found_inf`` flag with ``sync_free=True``, and calibrates a step whose every
        ``backward`` ran inside ``accumulate()``. Returns the calibrator."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if self.sync_free and not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise TypeError("optimizer: sync_free=True skips non-finite steps through optimizer.found_inf, which only "
                            "fused optimizers read (torch.optim.Adam/AdamW/SGD with fused=True)")
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise TypeError("optimizer: SparseAdam takes sparse gradients only, and calibrated gradients are dense "
                            "(use Adam/AdamW for the calibrated parameters)")
        if self._hook is not None:
            raise RuntimeError("this calibrator is already attached to an optimizer; call detach() first")
        self._hook = optimizer.register_step_pre_hook(self._pre_step_hook)
        if self.sync_free:
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
            # a step whose every gradient is zero or None changes nothing a calibration would:
            # torch.distributed.checkpoint's get/set_state_dict take one to create optimizer state
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if not any(bool(g.any()) for g in grads):
                return
            raise RuntimeError("optimizer.step() was called without FusedCalibrator.backward(losses) since the last step "
                               "(a loss.backward() leaves the calibrated parameters uncalibrated)")
        if self._phase == "pending":  # every backward() of the step ran in accumulate()
            self.step()
        if self.sync_free:  # the fused optimizer skips on the device flag
            optimizer.found_inf = self._found_inf  # type: ignore[attr-defined]
        if self._phase == "skipped":
            for group in optimizer.param_groups:  # skip the whole step, as GradScaler does
                for p in group["params"]:
                    p.grad = None
        self._phase = "idle"

    @torch.no_grad()
    def step(self) -> bool:
        """Calibrate and write ``.grad`` of the calibrated parameters, if not done yet.

        ``backward`` calls it when it returns, outside ``accumulate()``; call it yourself
        only to read ``.grad`` after backward calls that all ran inside ``accumulate()``
        (the optimizer hook calibrates them otherwise). Calling it again before the
        optimizer step returns the same answer and does nothing.

        Returns False (and writes no gradient) when the step was skipped for non-finite
        gradients under ``skip_nonfinite=True``; raises ``NonFiniteGradientError`` for
        them otherwise. The calibrator's state is untouched in both cases. With
        ``sync_free=True`` it returns True, and ``found_inf`` says on the device.
        """
        if self._phase in ("calibrated", "skipped"):
            return self._phase == "calibrated"
        if self._phase != "pending":
            raise RuntimeError("FusedCalibrator.step() needs backward(losses) first")
        world = 1
        if self._averager is not None:
            if not self._reducing:  # every backward of this step ran in accumulate(): reduce now
                if self._method.uses_rows and self._sharder is None:
                    for t in self.layout.buffers(GRADS):
                        self._averager.launch(t.view(-1))
                self._launch_reduction()
            self._averager.wait()
            if self._sharder is not None:
                self._sharder.wait()
            self._reducing = False
            world = self._averager.world_size
        scale = self._scaler.get_scale() if self._scaler is not None else 1.0
        self._scaler_mark = _mark(self._scaler) if self._scaler is not None else None
        if self._method.uses_rows and scale * world != 1.0:  # one pass: average over ranks and unscale together
            torch._foreach_mul_(self.layout.buffers(GRADS), 1.0 / (scale * world))
        ctx = StepContext(self.layout, self._ops, self._loss_values, self._steps, self.sync_free,
                          self._stats_group if self._method.uses_rows or self._fsdp is not None else None,
                          scores=self._score_sum if self._score_sum is None or self.sync_free else self._score_sum.cpu())
        result = self._method.step(ctx)
        self._diagnostics = result.diagnostics
        if self.sync_free:
            ok = result.ok if isinstance(result.ok, Tensor) else torch.tensor(result.ok, device=self.device)
            self._steps += ok.to(torch.int64)
            self._found_inf.copy_((~ok).to(torch.float32))
            self._write_grads()
            self._phase = "calibrated"
            return True
        # autograd's sum under a GradScaler: an inf is the scaler's to skip (no error), and no committed step
        scaler_skips = not bool(result.ok) and self._scaler is not None and not self._method.uses_rows
        ok = bool(result.ok) or scaler_skips
        if scaler_skips:
            self._diagnostics = {"skipped": torch.tensor(True)}
        if ok:
            self._steps += 0 if scaler_skips else 1
            if self._method.uses_rows:
                if scale != 1.0:  # the scaler unscales .grad again in scaler.step
                    self.layout.out.mul_(scale)
                self._write_grads()
        else:
            self._nonfinite(result.where())
        self._phase = "calibrated" if ok else "skipped"
        return ok

    def _write_grads(self) -> None:
        if not self._method.uses_rows:
            return
        if self._fsdp is not None:  # sharded DTensors over the local output, as FSDP2's optimizer expects
            self._fsdp.write(self.layout.out_views)
            self._add_prior_grads()
            return
        views = self.layout.out_views
        if self._sharder is not None:  # ZeRO-2: every rank's calibrated slices, gathered
            views = split_views(self._gathered, [p.shape for p in self.params])
            self._sharder.gather(self.layout.out_views, views)
        for p, view in zip(self.layout.params, views):
            p.grad = view if p.requires_grad else None  # frozen since construction: no optimizer moves it
        self._add_prior_grads()

    def _add_prior_grads(self) -> None:
        for i, prior in self._prior.items():
            p = self.params[i]
            p.grad = prior.add_(p.grad) if p.grad is not None else prior
        self._prior = {}

    def _nonfinite(self, where: str) -> None:
        if self._scaler is not None:  # overflow is routine under a scaler: let it skip and back off
            self.layout.out.fill_(float("inf"))
            self._write_grads()
            self._diagnostics = {"skipped": torch.tensor(True)}
            return
        for i, p in enumerate(self.params):  # nothing of this step; what earlier steps left stays
            p.grad = self._prior.get(i)
        self._prior = {}
        if self.options["skip_nonfinite"]:
            self._diagnostics = {"skipped": torch.tensor(True)}
            return
        self._phase = "idle"  # the step is abandoned: the next backward starts afresh
        raise NonFiniteGradientError(f"{where}; the calibrator's state is unchanged (pass skip_nonfinite=True to skip such steps)")

    @property
    def found_inf(self) -> Optional[Tensor]:
        """With ``sync_free=True``: a 0-dim float tensor on the device, 1.0 when the last step
        had non-finite gradients (and was skipped by calibrator and fused optimizer), else
        0.0. None in the host-synchronising mode, where ``step()`` returns that as a bool."""
        return self._found_inf

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes this calibrator holds: the per-objective rows (only where an objective
        reaches), the EMA state (one slot) and the output (which ``.grad`` views); sharded,
        this rank's slices of them, and (``shard=True``) the gathered ``.grad``."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        grads = sum(size(t) for t in self.layout.buffers(GRADS)) if self.layout.has_buffer(GRADS) else 0
        out = self.layout.output_bytes()
        gathered = 0 if self._gathered is None else size(self._gathered)
        return {"grad_buffer": grads, "ema_state": self._method.state_bytes(), "output": out, "gathered_grad": gathered}

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Method, options, step count, the layout's reach and the method's state (BOGC's
        EMA mean and variance per segment, the lagged weights). Sharded, it is this rank's shard
        (``"shard": {"rank", "world"}``): save one file per rank, as FSDP2's
        ``model.state_dict()`` is per rank, and resume with the same world size."""
        return {
            "format": 3,  # the layout of this dict; "version" names the mmgrad that wrote it
            "version": __version__,
            "shard": None if self._shard_of is None else dict(self._shard_of),
            "method": self.method,
            "num_objectives": self.num_objectives,
            "num_elements": self.num_elements,
            "group_offsets": self.group_offsets.clone(),
            "options": dict(self.options),
            "step_count": self.step_count,
            "reach": list(self.layout.reach),
            **self._method.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict`` of a calibrator built with the same parameters, method and
        method options (checkpoints of mmgrad 0.1 and 0.2, which held the raw EMA moments,
        load too). The whole state is checked first: a mismatch is a ``ValueError`` naming
        the key, and leaves this calibrator exactly as it was.

        The method's options (``beta``, ``estimator``, ``state_dtype``, ``lagged``, ...)
        shape the saved state, so they must equal this calibrator's; the options of how a
        step runs (``skip_nonfinite``, ``backward_mode``, ``sync_free``) are this
        calibrator's, whatever the checkpoint says."""
        state = self._checked_state(state)
        self.layout.set_reach(state["reach"])
        self._method.load_state_dict(state)
        steps = int(state["step_count"])
        self._steps = torch.full((), steps, dtype=torch.int64, device=self.device) if self.sync_free else steps
        self._phase = "idle"

    def _checked_state(self, state: Any) -> Dict[str, Any]:
        """``state`` checked against this calibrator, in the current format; raises before
        anything is changed."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        fmt = state.get("format")
        if fmt not in (None, 2, 3):  # None: mmgrad 0.1, which wrote no format
            raise ValueError(f"state format={fmt!r}: this mmgrad ({__version__}) reads formats 2 and 3 "
                             f"(and mmgrad 0.1's); the state was written by mmgrad {state.get('version', '?')}")
        for key, mine in (("method", self.method), ("num_objectives", self.num_objectives), ("num_elements", self.num_elements)):
            if state.get(key) != mine:
                raise ValueError(f"state {key}={state.get(key)!r} does not match this calibrator's {mine!r}")
        if "group_offsets" not in state or not torch.equal(torch.as_tensor(state["group_offsets"]), self.group_offsets):
            raise ValueError("state group_offsets do not match this calibrator's parameter groups")
        saved_shard = state.get("shard")
        if saved_shard != self._shard_of:
            def says(shard: Any) -> str:
                return "unsharded" if shard is None else f"rank {shard['rank']} of {shard['world']}"
            raise ValueError(f"state shard: the state was saved {says(saved_shard)}, this calibrator is "
                             f"{says(self._shard_of)}; a sharded state resumes on the same rank of the same world size")
        saved = METHODS[self.method].saved_options(state.get("options", {}))
        differ = sorted(k for k in saved if k not in _COMMON and (k not in self.options or saved[k] != self.options[k]))
        if differ:
            said = ", ".join(f"{k}={saved[k]!r} (this calibrator: {self.options.get(k, 'no such option')!r})" for k in differ)
            raise ValueError(f"state options {said}: build the calibrator with the checkpoint's options; loading "
                             "does not change them")
        if "step_count" not in state:
            raise ValueError("state has no step_count")
        state = dict(state) if "reach" in state else _from_dense_state(state, self.layout)
        reach = [tuple(int(k) for k in r) for r in state["reach"]]
        if len(reach) != len(self.params) or any(not 0 <= k < self.num_objectives for r in reach for k in r):
            raise ValueError(f"state reach names {len(reach)} parameters and objectives {sorted({k for r in reach for k in r})}; "
                             f"this calibrator has {len(self.params)} parameters and M={self.num_objectives}")
        state["reach"] = reach
        plan = [(rows, members) for rows, members in self.layout.plan(reach) if rows]
        shapes = [(len(rows), sum(self.layout.numels[i] for i in members)) for rows, members in plan]
        self._method.check_state(state, shapes)
        return state

    def __repr__(self) -> str:
        return (f"FusedCalibrator(method={self.method!r}, num_objectives={self.num_objectives}, "
                f"groups={len(self.groups)}, num_elements={self.num_elements}, backend={self.backend_name!r})")


def _mark(scaler: Any) -> tuple:
    """A GradScaler's (scale, growth tracker): every ``update()`` changes the pair (the
    scale backs off on an inf, else the tracker counts or the scale grows)."""
    state = scaler.state_dict()
    return state.get("scale"), state.get("_growth_tracker")


def _from_dense_state(state: Dict[str, Any], layout: Layout) -> Dict[str, Any]:
    """A checkpoint of mmgrad 0.1 (dense ``M x N`` moments) in the reach layout (the raw
    moments per segment, as 0.2 saved them). A row whose moments are all zero is exactly a
    row never reached, so the reach is read off them. Changes nothing of ``layout``."""
    state = dict(state)
    if "m" not in state:
        state["reach"] = [() for _ in layout.params]
        return state
    m, v = state["m"], state["v"]
    want = (layout.num_objectives, layout.num_elements)
    for name, t in (("m", m), ("v", v)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"state {name} must be the dense M x N = {want} moments of mmgrad 0.1; "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    reach, at = [], 0
    for p in layout.params:
        n = p.numel()
        held = (m[:, at : at + n] != 0).any(1) | (v[:, at : at + n] != 0).any(1)
        reach.append(tuple(int(k) for k in held.nonzero().flatten().tolist()))
        at += n
    state["reach"] = reach
    offsets = [0]
    for p in layout.params:
        offsets.append(offsets[-1] + p.numel())
    for name, dense in (("m", m), ("v", v)):
        parts = []
        for rows, members in layout.plan(reach):
            if rows:
                cols = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members])
                parts.append(dense[list(rows)][:, cols])
        state[name] = parts
    return state
