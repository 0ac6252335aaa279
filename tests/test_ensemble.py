"""CalibratedEnsemble: aggregation on the logit scale, weights, calibration, uncertainty, and that
an ensemble is at least as good as its best member."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import FAST_ENSEMBLE, compose_cfg
from within.calibration.metrics import auc, logloss
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec
from within.models.ensemble import CalibratedEnsemble, aggregate_logits


class LogitMember:
    """A fitted member stand-in: its logit is a column of the frame."""

    def __init__(self, column: str, processor: FeatureProcessor) -> None:
        self.column, self.processor = column, processor

    @property
    def spec(self):
        return self.processor.spec

    def predict_logits(self, X):
        return self.processor.spec.records_to_frame(X)[self.column].to_numpy(dtype=np.float64)


def make_members(df: pd.DataFrame, columns: list[str]) -> list[LogitMember]:
    fields = [{"name": c, "type": "numeric"} for c in columns]
    proc = FeatureProcessor(FeatureSpec.from_config({"label": "clicked", "fields": fields})).fit(df)
    return [LogitMember(c, proc) for c in columns]


def noisy_truth(n: int, noise: list[float], seed: int = 0) -> pd.DataFrame:
    """Members = true logit + independent noise of the given sd; labels drawn from the truth."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-3.4, 0.8, n)
    df = pd.DataFrame({f"m{j}": true_logit + 0.3 + rng.normal(0, sd, n) for j, sd in enumerate(noise)})
    df["clicked"] = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(float)
    return df


def test_aggregations_on_the_logit_scale():
    m = np.array([[0.0, 1.0, 10.0], [-1.0, -2.0, -3.0]])
    w = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(aggregate_logits(m, "mean", w, 0.2), [11 / 3, -2.0])
    np.testing.assert_allclose(aggregate_logits(m, "weighted", w, 0.2), [2.75, -1.75])
    np.testing.assert_allclose(aggregate_logits(m, "median", w, 0.2), [1.0, -2.0])
    np.testing.assert_allclose(aggregate_logits(m, "trimmed_mean", w, 0.2), [1.0, -2.0])  # drops 1 per end
    five = np.array([[0.0, 1.0, 2.0, 3.0, 100.0]])
    np.testing.assert_allclose(aggregate_logits(five, "trimmed_mean", np.ones(5) / 5, 0.2), [2.0])


def test_members_weights_and_errors():
    df = noisy_truth(500, [0.1, 0.2, 0.3])
    a, b, c = make_members(df, ["m0", "m1", "m2"])
    ens = CalibratedEnsemble([a, b], weights=[3.0, 1.0], aggregation_method="weighted")
    np.testing.assert_allclose(ens.get_model_weights(), [0.75, 0.25])
    np.testing.assert_allclose(ens.predict_logits(df), 0.75 * df.m0 + 0.25 * df.m1)
    ens.add_model(c, 4.0)
    np.testing.assert_allclose(ens.get_model_weights(), [3 / 8, 1 / 8, 4 / 8])
    assert ens.remove_model(0) is a and len(ens.base_models) == 2
    with pytest.raises(IndexError, match="out of range for 2 members"):
        ens.remove_model(5)
    with pytest.raises(ValueError, match="aggregation_method: 'avg' is not one of"):
        CalibratedEnsemble([a], aggregation_method="avg")
    with pytest.raises(ValueError, match="calibration_method: 'temp' is not one of"):
        CalibratedEnsemble([a], calibration_method="temp")
    with pytest.raises(TypeError, match="has no predict_logits"):
        ens.add_model(object())


def test_update_weights_follow_recent_logloss_and_calibrate():
    df = noisy_truth(20_000, [0.2, 1.5, 0.2])
    ens = CalibratedEnsemble(make_members(df, ["m0", "m1", "m2"]), aggregation_method="weighted")
    w = ens.update_weights(df, window=5_000)
    assert w[1] < w[0] and w[1] < w[2] and w.sum() == pytest.approx(1.0)
    raw = logloss(1 / (1 + np.exp(-ens.predict_logits(df))), df.clicked)
    ens.calibrate(df)
    assert ens.calibrator is not None and logloss(ens.predict(df), df.clicked) < raw


def test_uncertainty_is_the_member_spread():
    df = noisy_truth(300, [0.0, 0.0, 0.0])
    agree = CalibratedEnsemble(make_members(df, ["m0", "m1", "m2"]))
    _, sd = agree.predict_with_uncertainty(df)
    np.testing.assert_allclose(sd, 0.0, atol=1e-12)
    df2 = noisy_truth(300, [0.1, 0.5, 1.0])
    _, sd2 = CalibratedEnsemble(make_members(df2, ["m0", "m1", "m2"])).predict_with_uncertainty(df2)
    assert np.all(sd2 >= 0) and sd2.mean() > 0.001


@pytest.mark.parametrize("method", ["mean", "median", "trimmed_mean"])
def test_ensemble_of_three_beats_its_best_member_fast(method):
    """Fast version: members are the truth plus independent noise (calibrated on one half, scored on the other)."""
    df = noisy_truth(60_000, [0.5, 0.6, 0.7], seed=1)
    fit, test = df.iloc[:30_000], df.iloc[30_000:]
    members = make_members(df, ["m0", "m1", "m2"])
    ens = CalibratedEnsemble(members, aggregation_method=method).calibrate(fit)
    scores = []
    for m in members:
        single = CalibratedEnsemble([m]).calibrate(fit)
        p = single.predict(test)
        scores.append((auc(p, test.clicked), logloss(p, test.clicked)))
    p = ens.predict(test)
    assert auc(p, test.clicked) >= max(a for a, _ in scores) - 1e-3
    assert logloss(p, test.clicked) <= min(ll for _, ll in scores) + 1e-4


@pytest.mark.slow
def test_trained_ensemble_of_three_beats_its_best_member(tmp_path):
    from within.pipeline.train import run_train

    overrides = [*FAST_ENSEMBLE, "model.size=3", "data.source.n=20000", "trainer.max_epochs=3",
                 "postfit=[calibrate,ensemble,export]", "export.onnx=false"]
    run_train(compose_cfg("train", overrides, out_dir=tmp_path))
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["ensemble/auc"] >= m["ensemble/best_member_auc"] - 2e-3
    assert m["ensemble/logloss"] <= m["ensemble/best_member_logloss"] + 5e-4


@pytest.mark.slow
def test_seed_facade_fits_an_ensemble(tmp_path):
    """The seed's usage: AdScorePredictor(model_type="ensemble", ...).fit(df), then intervals."""
    from within import AdScorePredictor
    from within.data.simulator import simulate

    df = simulate(n=4000, seed=5)
    predictor = AdScorePredictor(
        feature_config={"text_features": ["headline"], "numerical_features": ["budget", "bid"],
                        "categorical_features": ["placement"]},
        model_type="ensemble", calibration=True,
        train_overrides=["trainer.max_epochs=1", "model.size=2", "model.member.net.hidden_dims=[16]",
                         "postfit=[calibrate,intervals,export]", "export.onnx=false", "extras.print_config=false"],
    )
    predictor.fit(df, output_dir=tmp_path)
    assert isinstance(predictor.model, CalibratedEnsemble) and len(predictor.model.base_models) == 2
    assert predictor.model_type == "ensemble"
    score, lower, upper = predictor.predict_with_intervals(df.iloc[:20])
    assert np.all((lower <= score) & (score <= upper))


def test_member_overrides_train_members_of_another_type(tmp_path):
    """model.member_overrides[k - 1] applies to member k only: here member 1 gets a cross layer."""
    from within.models.base import BaseMLModel
    from within.pipeline.train import run_train

    overrides = [*FAST_ENSEMBLE, "model.size=2", "data.source.n=3000", "trainer.max_epochs=1",
                 "model.member.net.hidden_dims=[16]", "postfit=[export]", "export.onnx=false",
                 "model.member_overrides=[{model.net.cross_layers: 1}]"]
    run_train(compose_cfg("train", overrides, out_dir=tmp_path))
    assert (tmp_path / "members" / "1" / "checkpoints" / "last.ckpt").is_file()
    ens = BaseMLModel.load(tmp_path / "bundle")
    assert [len(m.net.cross) for m in ens.base_models] == [0, 1]  # member 0 keeps this run's config
    assert [m.net.tower[0].out_features for m in ens.base_models] == [16, 16]


def test_in_a_pruning_sweep_only_member_0_reports_to_the_trial(tmp_path):
    """The trial's objective is member 0's metric, so members 1.. must not report their curves to it."""
    from omegaconf import open_dict

    from within.pipeline.train import build_recipe

    cfg = compose_cfg("train", [*FAST_ENSEMBLE, "model.size=3"], out_dir=tmp_path)
    with open_dict(cfg):
        cfg.optuna_trial = {"number": 4, "study_name": "s", "storage": "sqlite://"}
    recipe = build_recipe(cfg)
    assert [recipe.member_config(cfg, k, tmp_path).get("optuna_trial") is not None for k in range(3)] == [
        True, False, False]


@pytest.mark.parametrize("entry,match", [
    ("[{model.net.no_such_key: 1}]", "not a key of a member's config"),
    ("[{model.net.cross_layers: 1}, {model.net.cross_layers: 2}]", "at most size - 1 = 1"),
    ("[{trainer.max_epoch: 2}]", "not a key"),
])
def test_member_overrides_are_checked_before_training(tmp_path, entry, match):
    from within.pipeline.config import ConfigError
    from within.pipeline.train import build_recipe

    cfg = compose_cfg("train", [*FAST_ENSEMBLE, "model.size=2", f"model.member_overrides={entry}"],
                      out_dir=tmp_path)
    with pytest.raises(ConfigError, match=match):
        build_recipe(cfg).check(cfg)


def test_an_ensemble_of_a_network_and_a_dynamic_linear_trains_and_predicts(tmp_path):
    """The spec's "diverse base models": any fitted BaseMLModel with logits can be a member."""
    import torch

    from within.data.simulator import simulate
    from within.models.base import BaseMLModel
    from within.models.linear import DynamicLinear
    from within.models.network import NetworkModel
    from within.nn.predictor import AdPredictorNN
    from within.pipeline.recipes.linear import featurizer_for

    df = simulate(n=3000, seed=4)
    train, val, test = df.iloc[:2000], df.iloc[2000:2500], df.iloc[2500:]
    fields = [{"name": "placement", "type": "categorical"}, {"name": "device", "type": "categorical"},
              {"name": "bid", "type": "numeric"}, {"name": "headline", "type": "text"}]
    spec = FeatureSpec.from_config({"label": "clicked", "fields": fields})
    proc = FeatureProcessor(spec).fit(train)
    torch.manual_seed(0)
    net = AdPredictorNN(input_dim=proc.input_dim, hidden_dims=[8])
    batch = {k: torch.as_tensor(v) for k, v in proc.transform(train, with_label=True).items()}
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch), batch["label"])
        loss.backward()
        opt.step()
    network = NetworkModel(processor=proc, net=net.eval())
    linear = DynamicLinear(n_features=2**12, alpha=1e-5, spec=spec)
    linear.attach_featurizer(featurizer_for(spec, 2**12))
    linear.fit(train, train["clicked"].to_numpy())
    ensemble = CalibratedEnsemble([network, linear], calibration_method="temperature").calibrate(val)
    p = ensemble.predict(test)
    assert p.shape == (len(test),) and np.all((p > 0) & (p < 1))
    both = (network.predict_logits(test) + linear.predict_logits(test)) / 2
    np.testing.assert_allclose(ensemble.predict_logits(test), both, atol=1e-12)  # the members' mean logit
    assert ensemble.calibrator is not None and not np.allclose(p, 1 / (1 + np.exp(-both)))  # then calibrated
    loaded = BaseMLModel.load(ensemble.save(tmp_path / "bundle"))
    assert [type(m).__name__ for m in loaded.base_models] == ["NetworkModel", "DynamicLinear"]
    np.testing.assert_allclose(loaded.predict(test), p, atol=1e-9)
