"""A thin training loop for multi-view models, with or without a ``FusedCalibrator``.

>>> import torch, mmgrad
>>> from mmgrad.training.data import synthetic_multiview
>>> from mmgrad.training.models import LateFusion
>>> from mmgrad.training.train import fit, evaluate
>>> data = synthetic_multiview(n=400, snr=(3.0, 0.5), seed=0)
>>> model = LateFusion(data.dims, data.num_classes)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
>>> cal = mmgrad.FusedCalibrator(model.param_groups(), num_objectives=3, method="bogc").attach(opt)
>>> history = fit(model, data, opt, cal, epochs=3, progress=False)
>>> sorted(evaluate(model, data))
['fused', 'probe']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..calibrator import FusedCalibrator
from .data import MultiViewData, Split

Tensor = torch.Tensor

OBJECTIVES = ("fused", "all")


@dataclass
class History:
    """Per-epoch record of a ``fit``; ``weights``/``uncertainty`` come from the calibrator."""

    train_loss: List[float] = field(default_factory=list)
    val_accuracy: List[float] = field(default_factory=list)
    weights: List[List[float]] = field(default_factory=list)
    uncertainty: List[float] = field(default_factory=list)
    best_epoch: int = -1
    best_val_accuracy: float = 0.0


def _batches(split: Split, batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(split), generator=gen)
    for i in range(0, len(split), batch_size):
        yield split.subset(order[i : i + batch_size])


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, views: Optional[Sequence[str]] = None) -> float:
    model.eval()
    pred = model.predict(split.x, views).argmax(dim=1)
    model.train()
    return float((pred == split.y).float().mean())


def fit(
    model: nn.Module,
    data: MultiViewData,
    optimizer: torch.optim.Optimizer,
    calibrator: Optional[FusedCalibrator] = None,
    *,
    objectives: str = "all",
    epochs: int = 60,
    batch_size: int = 64,
    patience: int = 10,
    micro_batches: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> History:
    """Train ``model`` on ``data.train``, early-stopping on validation fused accuracy.

    Without a calibrator, ``objectives="all"`` backpropagates the summed losses and
    ``"fused"`` the fused loss alone (classic joint training). With one, the losses go to
    ``calibrator.backward`` (split into ``micro_batches`` chunks for the sample
    estimator), which calibrates. The best epoch's weights are
    restored at the end.
    """
    if objectives not in OBJECTIVES:
        raise ValueError(f"objectives must be one of {list(OBJECTIVES)}; got {objectives!r}")
    if calibrator is not None and calibrator._hook is None:
        raise ValueError("calibrator must be attached to the optimizer (calibrator.attach(optimizer))")
    sample = calibrator is not None and calibrator.options.get("estimator") == "sample"
    gen = torch.Generator().manual_seed(seed)
    hist, best_state, stale = History(), None, 0
    bar = tqdm(range(epochs), disable=not progress, leave=False, desc=type(model).__name__)
    model.train()
    for epoch in bar:
        losses_sum, steps, weights, unc = 0.0, 0, [], []
        for b in _batches(data.train, batch_size, gen):
            if sample:
                if len(b) < 2:  # no variance from a single sample
                    continue
                chunks = [b.subset(idx) for idx in torch.arange(len(b)).chunk(micro_batches)]
                per_chunk = [model.losses(c.x, c.y) for c in chunks]
                losses = [torch.stack(col).mean() for col in zip(*per_chunk)]
                calibrator.backward(per_chunk)
            else:
                losses = model.losses(b.x, b.y)
                if calibrator is not None:
                    calibrator.backward(losses)
                elif objectives == "fused":
                    losses[0].backward()
                else:
                    torch.stack(losses).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses_sum += float(sum(l.detach() for l in losses))
            steps += 1
            if calibrator is not None:
                d = calibrator.diagnostics
                if "weights" in d:
                    weights.append(d["weights"].detach().double())
                if "uncertainty" in d:
                    unc.append(float(d["uncertainty"]))
        hist.train_loss.append(losses_sum / max(steps, 1))
        hist.val_accuracy.append(accuracy(model, data.val))
        if weights:
            hist.weights.append(torch.stack(weights).mean(0).tolist())
        if unc:
            hist.uncertainty.append(sum(unc) / len(unc))
        if hist.val_accuracy[-1] > hist.best_val_accuracy or best_state is None:
            hist.best_val_accuracy, hist.best_epoch, stale = hist.val_accuracy[-1], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val=f"{hist.val_accuracy[-1]:.3f}")
        if stale >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, l2: float = 1e-3) -> float:
    """Accuracy of a multinomial logistic regression fitted (L-BFGS) on frozen features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    lin = nn.Linear(a.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), train_y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(1) == test_y).float().mean())


@torch.no_grad()
def _features(model: nn.Module, split: Split, view: str) -> Tensor:
    model.eval()
    f = model.view_features(split.x, view)
    model.train()
    return f


def evaluate(model: nn.Module, data: MultiViewData, split: str = "test", strongest: Optional[str] = None) -> Dict[str, object]:
    """Fused accuracy; each view's linear-probe accuracy on its frozen encoder (probe fitted
    on train, the same way for every method); and, given ``strongest``, fused accuracy
    with that view removed."""
    part = getattr(data, split)
    res: Dict[str, object] = {"fused": accuracy(model, part)}
    with torch.enable_grad():
        res["probe"] = {v: linear_probe(_features(model, data.train, v), data.train.y, _features(model, part, v), part.y, data.num_classes)
                        for v in data.views if v in getattr(model, "views", data.views)}
    if strongest is not None and len(data.views) > 1:
        res["without_strongest"] = accuracy(model, part, [v for v in data.views if v != strongest])
    return res
