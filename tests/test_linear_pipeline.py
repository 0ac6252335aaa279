"""model=linear through train.py's pipeline: report, loadable bundle that predicts raw frames, bundle update."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import compose_cfg
from within.calibration.metrics import binary_report
from within.features.spec import FeatureError
from within.models.base import BaseMLModel
from within.models.linear import DynamicLinear, HashingFeaturizer
from within.pipeline.data import build_datamodule
from within.pipeline.recipes.linear import main, update_bundle
from within.pipeline.train import run_train

LINEAR_FAST = ["model=linear", "data.source.n=6000", "extras.print_config=false", "model.linear.epochs=2"]


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear_run")
    cfg = compose_cfg("train", LINEAR_FAST, out_dir=out)
    run_train(cfg)
    return out, build_datamodule(cfg).split()


def test_train_py_model_linear_writes_report_and_bundle(linear_run):
    out, frames = linear_run
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for key in ("test/auc", "test/logloss", "test/ece", "test/ece_true", "val/auc", "val/logloss", "train/loss",
                "calib/ece_calibrated"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["test/auc"] > 0.52  # it learned something on 3.6k rows
    for name in ("reliability.png", "report.md", "training_curve.png"):
        assert (out / "report" / name).is_file(), name
    report = (out / "report" / "report.md").read_text()
    assert "DynamicLinear" in report
    assert "| `quantize` | skipped |" in report and "no network to quantize" in report
    rows = pd.read_csv(out / "csv" / "metrics.csv")
    assert rows["val/auc"].notna().sum() == 2  # one val score per pass

    model = BaseMLModel.load(out / "bundle")
    assert isinstance(model, DynamicLinear) and model.calibrator is not None
    test = frames["test"]
    p = model.predict(test)  # raw DataFrame: hashed, scaled, bag-of-words, calibrated
    again = binary_report(p, test["clicked"].to_numpy(float))
    assert again["logloss"] == pytest.approx(metrics["test/logloss"], rel=1e-9)
    assert again["auc"] == pytest.approx(metrics["test/auc"], rel=1e-9)
    with pytest.raises(ValueError, match="headline"):
        model.predict(test.drop(columns=["headline"]))


def test_run_directory_is_the_last_line(tmp_path, capsys):
    cfg = compose_cfg("train", LINEAR_FAST + ["data.source.n=3000", "postfit=[]", "logger=none"], out_dir=tmp_path)
    run_train(cfg)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path)
    model = BaseMLModel.load(tmp_path / "bundle")
    assert model.calibrator is None  # no calibrate step -> raw sigmoid


def test_text_is_a_bag_of_words():
    f = HashingFeaturizer(categorical=["c"], text=["t"], n_features=2**12)
    df = pd.DataFrame({"c": ["a", "a", "a"], "t": ["Red shoes sale", "sale shoes red", "blue hat"]})
    X = f.fit_transform(df).toarray()
    np.testing.assert_allclose(X[0], X[1])  # order and case do not matter
    assert not np.allclose(X[0], X[2])
    assert X[0].sum() == pytest.approx(2.0)  # one for c=a, 3 words x 1/3
    g = HashingFeaturizer.from_dict(json.loads(json.dumps(f.to_dict())))
    np.testing.assert_allclose(g.transform(df).toarray(), X)


def test_update_bundle_with_new_rows(linear_run, tmp_path):
    out, frames = linear_run
    bundle = tmp_path / "bundle"
    shutil.copytree(out / "bundle", bundle)
    before = BaseMLModel.load(bundle)
    new = frames["test"].drop(columns=["main_image"])  # new rows need only the fields the model reads
    updated = update_bundle(bundle, new)
    assert updated.rows_seen == before.rows_seen + len(new)
    reloaded = BaseMLModel.load(bundle)
    assert not np.allclose(reloaded.get_coefficients(), before.get_coefficients())
    np.testing.assert_allclose(reloaded.get_coefficients(), updated.get_coefficients())
    assert reloaded.metadata["updates"] == [{"rows": len(new)}]
    assert not np.allclose(reloaded.predict(new), before.predict(new))
    # the original run's bundle is untouched
    assert BaseMLModel.load(out / "bundle").rows_seen == before.rows_seen


def test_update_bundle_cli_and_bad_rows(linear_run, tmp_path):
    out, frames = linear_run
    rows = frames["val"].drop(columns=["main_image"])
    csv = tmp_path / "rows.csv"
    rows.to_csv(csv, index=False)
    main([str(out / "bundle"), str(csv), "--out", str(tmp_path / "updated")])
    model = BaseMLModel.load(tmp_path / "updated")
    assert model.rows_seen == BaseMLModel.load(out / "bundle").rows_seen + len(rows)
    with pytest.raises(ValueError, match="clicked"):
        update_bundle(out / "bundle", rows.drop(columns=["clicked"]))
    bad = rows.copy()
    bad["bid"] = "high"
    with pytest.raises(FeatureError, match="bid"):
        update_bundle(out / "bundle", bad)


def test_linear_refuses_privacy(tmp_path):
    from within.pipeline.config import ConfigError

    cfg = compose_cfg("train", LINEAR_FAST + ["privacy=dp"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="privacy=none"):
        run_train(cfg)
