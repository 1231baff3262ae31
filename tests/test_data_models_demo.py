"""The UCI loader, the synthetic generator, the models with missing views, and the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mmgrad
from mmgrad.training.data import UCI_VIEWS, load_uci_views, stratified_split, synthetic_multiview, uci_data_dir, uci_digits
from mmgrad.training.models import I2M2, LateFusion
from mmgrad.training.train import evaluate, fit

DIMS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}


def test_uci_shapes_and_labels():
    feats, y = load_uci_views()
    assert tuple(feats) == UCI_VIEWS
    for v, x in feats.items():
        assert x.shape == (2000, DIMS[v]) and x.dtype == np.float32
    assert y.shape == (2000,) and np.bincount(y).tolist() == [200] * 10


def test_label_column_is_not_a_feature():
    feats, y = load_uci_views(["mor"])
    raw = np.loadtxt(uci_data_dir() / "mfeat-mor.csv", delimiter=",", skiprows=1)
    assert raw.shape[1] == DIMS["mor"] + 1 and np.array_equal(raw[:, -1], y)
    assert np.array_equal(raw[:, :-1].astype(np.float32), feats["mor"])


def test_splits_are_stratified_disjoint_and_fixed_by_seed():
    _, y = load_uci_views(["mor"])
    tr, va, te = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    assert len(set(tr) | set(va) | set(te)) == 2000 and not (set(tr) & set(va)) and not (set(tr) & set(te))
    assert np.bincount(y[va]).tolist() == [40] * 10
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), stratified_split(y, (0.6, 0.2, 0.2), seed=3)))
    assert not np.array_equal(tr, stratified_split(y, (0.6, 0.2, 0.2), seed=4)[0])


def test_standardisation_uses_train_only():
    data = uci_digits(["fou", "zer"], seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (1200, 400, 400)
    for v in data.views:
        assert torch.allclose(data.train.x[v].mean(0), torch.zeros(DIMS[v]), atol=1e-4)
        assert data.test.x[v].mean(0).abs().max() > 1e-3  # test rows were not used to fit it


def test_bad_view_names():
    with pytest.raises(ValueError, match="subset of"):
        uci_digits(["fac", "audio"])
    with pytest.raises(ValueError, match="snr"):
        synthetic_multiview(snr=[])


def test_synthetic_imbalance_is_controlled_by_snr():
    data = synthetic_multiview(n=1500, snr=(4.0, 0.1), seed=0)
    accs = {}
    for v in data.views:
        model = LateFusion({v: data.dims[v]}, data.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        fit(model, data_view(data, v), opt, objectives="fused", epochs=15, progress=False)
        accs[v] = evaluate(model, data_view(data, v))["fused"]
    assert accs["v0"] > accs["v1"] + 0.2


def data_view(data, v):
    from mmgrad.training.data import MultiViewData, Split

    pick = lambda s: Split({v: s.x[v]}, s.y)
    return MultiViewData(data.name, (v,), data.num_classes, pick(data.train), pick(data.val), pick(data.test))


@pytest.mark.parametrize("cls", [LateFusion, I2M2])
def test_models_predict_with_any_subset_of_views(cls):
    model = cls({"a": 5, "b": 3, "c": 4}, num_classes=4)
    x = {"a": torch.randn(6, 5), "b": torch.randn(6, 3), "c": torch.randn(6, 4)}
    full = model.predict(x)
    for views in (["a"], ["b", "c"], ["c"]):
        part = model.predict({k: x[k] for k in views}, views=views)
        assert part.shape == (6, 4) and torch.isfinite(part).all() and not torch.allclose(part, full)
    losses = model.losses(x, torch.randint(0, 4, (6,)))
    assert len(losses) == 4 and len(model.param_groups()) == 3
    with pytest.raises(ValueError, match="not views"):
        model.predict(x, views=["d"])


def test_fit_with_every_calibrator_method_on_i2m2():
    data = synthetic_multiview(n=300, snr=(3.0, 0.5), seed=0)
    for method in ("bogc", "mgda", "mmpareto", "mimo", "sum", "mean"):
        model = I2M2(data.dims, data.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cal = mmgrad.FusedCalibrator(model.param_groups(), 3, method=method).attach(opt)
        hist = fit(model, data, opt, cal, epochs=2, progress=False)
        assert len(hist.val_accuracy) == 2 and hist.weights


@pytest.mark.parametrize("task", ["UCI, 4 views (fac fou zer mor)", "UCI, 4 views, 5 % training split",
                                  "complementary synthetic, 3 views"])
def test_quick_demo_end_to_end(tmp_path, task):
    from mmgrad.tools.demo import CONTROLS, main

    assert main(["--quick", "--workers", "1", "--out", str(tmp_path), "--tasks", task]) == 0
    res = json.loads((tmp_path / "demo.json").read_text())
    rows = res["results"][task]["methods"]
    assert {"fused only", "fused + unimodal (sum)", "bogc", "mgda", "mmpareto", "mimo", "ogm-ge", "i2m2", "i2m2 (sum)",
            "i2m2 + bogc"} <= set(rows)
    assert all(0.0 <= r["fused"][0] <= 1.0 for r in rows.values())
    # every calibrated row is paired with its control: the same model on the same objectives, summed
    assert CONTROLS["i2m2 + bogc"] == "i2m2 (sum)" and CONTROLS["bogc"] == "fused + unimodal (sum)"
    for m, control in CONTROLS.items():
        assert rows[m]["control"] == control and rows[m]["vs_control"] == "n/a (1 seed)"
    assert (tmp_path / "demo.png").stat().st_size > 10_000
