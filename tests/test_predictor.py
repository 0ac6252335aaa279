"""The user-facing AdScorePredictor: fit through the pipeline for every model_type, predict in every
input form, intervals, update (a warm start recorded as a new version), save / load."""
from __future__ import annotations

import numpy as np
import pytest

from within import AdScorePredictor
from within.data.simulator import simulate

FEATURES = {"text_features": ["headline"], "numerical_features": ["budget", "bid"],
            "categorical_features": ["placement", "device"]}
QUICK = ["trainer.max_epochs=1", "model.net.hidden_dims=[16]", "data.batch_size=512",
         "postfit=[calibrate,intervals]", "logger=none"]


@pytest.fixture(scope="module")
def frames():
    return simulate(n=4000, seed=5), simulate(n=3000, seed=5, sample_seed=99)


@pytest.fixture(scope="module")
def fitted(frames, tmp_path_factory):
    df, _ = frames
    predictor = AdScorePredictor(feature_config=FEATURES, model_type="nn", train_overrides=QUICK)
    return predictor.fit(df, output_dir=tmp_path_factory.mktemp("fit"))


def test_predict_takes_a_dict_a_list_or_a_frame(fitted, frames):
    df = frames[0].iloc[:5]
    records = df[["headline", "budget", "bid", "placement", "device"]].to_dict("records")
    p = fitted.predict(df)
    assert isinstance(fitted.predict(records[0]), float)
    np.testing.assert_allclose(fitted.predict(records), p, atol=1e-6)  # float32 sums differ by batch size
    assert fitted.predict(records[0]) == pytest.approx(p[0], abs=1e-6)
    score, lo, hi = fitted.predict_with_intervals(records[0])
    assert lo <= score <= hi


def test_update_is_a_warm_start_recorded_as_a_version(fitted, frames, tmp_path):
    _, new = frames
    before = fitted.model.net.state_dict()["head.weight"].clone()
    fitted.update(new, output_dir=tmp_path / "update")
    versions = fitted.versions
    assert [v["kind"] for v in versions] == ["fit", "update"] and versions[-1]["version"] == 2
    assert versions[-1]["train_rows"] > 0 and versions[-1]["total_train_rows"] > versions[0]["train_rows"]
    assert fitted.model.model_version == "2"
    after = fitted.model.net.state_dict()["head.weight"]
    assert not np.allclose(after.numpy(), before.numpy())  # it trained ...
    assert np.corrcoef(after.numpy().ravel(), before.numpy().ravel())[0, 1] > 0.5  # ... from the fitted weights
    again = AdScorePredictor.load(tmp_path / "update" / "bundle")
    assert again.versions == versions and again.model_type == "nn"


def test_linear_model_type_fits_and_updates_by_ftrl(frames, tmp_path):
    df, new = frames
    predictor = AdScorePredictor(feature_config=FEATURES, model_type="linear", train_overrides=["logger=none"])
    predictor.fit(df, output_dir=tmp_path / "fit")
    seen = predictor.model.rows_seen
    assert 0.0 < predictor.predict(df.iloc[0].to_dict()) < 1.0
    predictor.update(new, output_dir=tmp_path / "update")
    assert predictor.model.rows_seen > seen
    assert [v["kind"] for v in predictor.versions] == ["fit", "update"]


def test_without_uncertainty_intervals_say_how_to_turn_them_on(frames, tmp_path):
    df, _ = frames
    predictor = AdScorePredictor(feature_config=FEATURES, uncertainty=False,
                                 train_overrides=[q for q in QUICK if not q.startswith("postfit")])
    predictor.fit(df.iloc[:2500], output_dir=tmp_path)
    assert predictor.intervals is None
    with pytest.raises(RuntimeError, match="uncertainty=True"):
        predictor.predict_with_intervals(df.iloc[:3])


def test_bad_settings_and_unfitted_use_fail_clearly():
    with pytest.raises(ValueError, match="model_type: 'forest'"):
        AdScorePredictor(model_type="forest")
    with pytest.raises(RuntimeError, match="not trained"):
        AdScorePredictor().predict({"budget": 1.0})
