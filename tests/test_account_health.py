"""AccountHealthPredictor: SHAP factors recover the simulator's true churn factors, probabilities are
calibrated against the known truth, recommendations re-score, early warning, trends, save/load, errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import needs_data
from within.calibration.metrics import auc, ece_true
from within.data.accounts import CHURN_COEF, INDICATORS, AccountChurnSimulator, trailing_mean
from within.data.simulator import AdMarketSimulator
from within.features.spec import FeatureError
from within.models.account_health import AccountHealthPredictor, _risk_level
from within.models.base import BaseMLModel, BundleError

WORLD = {"n_accounts": 500, "campaigns_per_account": 2, "ad_groups_per_campaign": 1, "ads_per_ad_group": 1}


@pytest.fixture(scope="module")
def sim_split():
    cs = AccountChurnSimulator(AdMarketSimulator(seed=5, **WORLD), months=24)
    panel = cs.panel()
    train = panel[panel["account_id"] < "acc_375"].reset_index(drop=True)
    test = panel[panel["account_id"] >= "acc_375"].reset_index(drop=True)
    return cs, train, test


@pytest.fixture(scope="module", params=["gbm", "logistic"])
def fitted(request, sim_split):
    _, train, _ = sim_split
    model = AccountHealthPredictor(list(INDICATORS), model_type=request.param, period_column="month")
    return model.fit(train, "churned")


def test_shap_ranks_the_true_factors_first_and_tracks_their_terms(fitted, sim_split):
    cs, train, test = sim_split
    shap = fitted.shap_values(test)
    ranking = shap.abs().mean().sort_values(ascending=False).index.tolist()
    assert set(ranking[: len(CHURN_COEF)]) == set(CHURN_COEF)
    truth = cs.true_contributions(test, reference=train)
    floor = 0.99 if fitted.model_type == "logistic" else 0.65  # a linear truth is exact for the linear model
    for factor in CHURN_COEF:
        assert np.corrcoef(shap[factor], truth[factor])[0, 1] > floor, factor


def test_churn_risk_is_calibrated_against_the_truth(fitted, sim_split):
    _, _, test = sim_split
    p = fitted.predict_churn_risk(test)
    assert ece_true(p, test["churn_probability"].to_numpy(), n_bins=10) < 0.02
    assert auc(p, test["churned"]) > 0.85
    assert fitted.training_["split_by_account"]  # the panel repeats ids: calibration rows are other accounts


def test_shap_additivity_and_lightgbm_agreement(sim_split):
    _, train, test = sim_split
    model = AccountHealthPredictor(list(INDICATORS), model_type="gbm").fit(train, "churned")
    x = model._encoder.transform(test[list(INDICATORS)])
    values, base = model._shap(x)
    np.testing.assert_allclose(values.sum(axis=1) + base, model._margin(x), atol=1e-6)
    np.testing.assert_allclose(values, model._booster.predict(x, pred_contrib=True)[:, :-1], atol=1e-8)


def test_health_score_and_risk_levels(fitted, sim_split):
    _, _, test = sim_split
    h = fitted.predict_health(test.head(50))
    np.testing.assert_allclose(h["health"], 100 * (1 - h["churn_probability"]))
    assert list(h.columns) == ["account_id", "month", "churn_probability", "health", "risk_level"]
    levels = _risk_level(np.array([0.0, 29.9, 30.0, 49.9, 50.0, 69.9, 70.0, 100.0]),
                         {"critical": 30, "high": 50, "medium": 70})
    assert levels.tolist() == ["critical", "critical", "high", "high", "medium", "medium", "low", "low"]


def test_factors_and_actions_rescore_the_account(fitted, sim_split):
    _, _, test = sim_split
    h = fitted.predict_health(test)
    worst = h.sort_values("churn_probability").iloc[-1]["account_id"]
    factors = fitted.get_contributing_factors(worst)
    assert [f["indicator"] for f in factors] == sorted((f["indicator"] for f in factors),
                                                       key=lambda n: -abs(next(g["shap"] for g in factors if g["indicator"] == n)))
    assert {f["indicator"] for f in factors} == set(INDICATORS)
    json.dumps(factors)  # plain values for an API
    actions = fitted.recommend_actions(worst)
    assert actions, "the riskiest account should have something to improve"
    latest = test[test["account_id"] == worst].sort_values("month").tail(1)
    for a in actions:
        moved = latest.copy()
        moved[a["indicator"]] = a["target"]
        assert a["expected_effect"] < 0 and a["shap"] > 0
        assert fitted.predict_churn_risk(moved)[0] == pytest.approx(a["churn_risk_after"], rel=1e-9)
        assert a["churn_risk_now"] == pytest.approx(fitted.predict_churn_risk(latest)[0], rel=1e-9)
        assert a["evidence"]["at_target"]["rows"] > 0
    assert [a["expected_effect"] for a in actions] == sorted(a["expected_effect"] for a in actions)


def test_actionable_healthy_values_and_action_texts(sim_split):
    _, train, test = sim_split
    model = AccountHealthPredictor(list(INDICATORS), actionable=["days_since_last_launch"],
                                   healthy_values={"days_since_last_launch": 5.0},
                                   action_texts={"days_since_last_launch": "Launch a new campaign"}).fit(train, "churned")
    stale = test.assign(days_since_last_launch=300.0)
    model.predict_health(stale)
    actions = model.recommend_actions(stale["account_id"].iloc[0])
    assert [a["indicator"] for a in actions] == ["days_since_last_launch"]
    assert actions[0]["target"] == 5.0
    assert actions[0]["action"] == "Launch a new campaign: lower days_since_last_launch from 300 to about 5"


def test_early_warning_flags_a_falling_account(sim_split):
    _, train, test = sim_split
    model = AccountHealthPredictor(list(INDICATORS), time_window=4, period_column="month").fit(train, "churned")
    calm = test[test["account_id"] == test["account_id"].iloc[0]].head(6).copy()
    calm[list(INDICATORS)] = calm[list(INDICATORS)].iloc[0].to_numpy()  # the same month six times: flat health
    falling = calm.copy()
    falling["account_id"] = "acc_falling"
    steps = np.arange(6)
    falling["spend_trend"] = -0.4 * steps
    falling["support_tickets"] = steps
    falling["budget_utilization"] = 0.8 - 0.12 * steps
    out = model.early_warning(pd.concat([calm, falling])).set_index("account_id")
    assert bool(out.loc["acc_falling", "warning"]) and out.loc["acc_falling", "periods"] == 4
    assert out.loc["acc_falling", "drop"] >= 10 and not bool(out.loc[calm["account_id"].iloc[0], "warning"])
    assert out.loc[calm["account_id"].iloc[0], "drop"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(FeatureError, match="early_warning: needs period_column"):
        AccountHealthPredictor(list(INDICATORS)).fit(train, "churned").early_warning(test)


def test_trend_indicators_are_computed_per_account(sim_split):
    _, train, _ = sim_split
    model = AccountHealthPredictor(["monthly_spend", "support_tickets"], trend_indicators=["monthly_spend"],
                                   time_window=2, period_column="month", model_type="logistic")
    shuffled = train.sample(frac=1.0, random_state=0)  # the trend follows period order, not row order
    model.fit(shuffled, "churned")
    assert model.feature_names == ["monthly_spend", "support_tickets", "monthly_spend_trend"]
    feats = model._feature_frame(shuffled, "test")
    ordered = shuffled.sort_values(["account_id", "month"])
    want = ordered["monthly_spend"] - trailing_mean(ordered["monthly_spend"].to_numpy(), ordered["account_id"].to_numpy(), 2)
    np.testing.assert_allclose(feats.loc[ordered.index, "monthly_spend_trend"], want)
    with pytest.raises(ValueError, match="trend_indicators: trends need each account's history; set period_column"):
        AccountHealthPredictor(["monthly_spend"], trend_indicators=["monthly_spend"])


def test_save_load_round_trip_without_pickle(fitted, sim_split, tmp_path):
    _, _, test = sim_split
    path = fitted.save(tmp_path / "bundle")
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "model.safetensors"]
    loaded = BaseMLModel.load(path)
    assert isinstance(loaded, AccountHealthPredictor) and loaded.model_type == fitted.model_type
    np.testing.assert_array_equal(loaded.predict_churn_risk(test), fitted.predict_churn_risk(test))
    acc = test["account_id"].iloc[-1]
    assert loaded.get_contributing_factors(acc) == fitted.get_contributing_factors(acc)
    assert loaded.recommend_actions(acc) == fitted.recommend_actions(acc)
    meta = json.loads((path / "metadata.json").read_text())
    meta["config"]["encoder"]["numeric"] = meta["config"]["encoder"]["numeric"][:-1]
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="encoder and model disagree"):
        BaseMLModel.load(path)


def test_errors_name_the_field(sim_split):
    _, train, _ = sim_split
    with pytest.raises(ValueError, match="model_type: 'svm' is not one of"):
        AccountHealthPredictor(["ctr"], model_type="svm")
    with pytest.raises(ValueError, match=r"risk_thresholds: 'high' must be a health score in \[0, 100\], got 120"):
        AccountHealthPredictor(["ctr"], risk_thresholds={"high": 120})
    with pytest.raises(ValueError, match="time_window: must be an int >= 1"):
        AccountHealthPredictor(["ctr"], time_window=0)
    with pytest.raises(ValueError, match=r"actionable: \['tenure'\] are not among"):
        AccountHealthPredictor(["ctr"], actionable=["tenure"])
    with pytest.raises(ValueError, match="make_calibrator: unknown calibrator 'magic'"):
        AccountHealthPredictor(["ctr"], calibration="magic")
    model = AccountHealthPredictor(["ctr", "support_tickets"])
    with pytest.raises(RuntimeError, match="predict_churn_risk: not fitted"):
        model.predict_churn_risk(train)
    with pytest.raises(ValueError, match="both classes present"):
        model.fit(train, np.zeros(len(train)))
    model.fit(train, "churned")
    with pytest.raises(FeatureError, match=r"lacks indicator columns \['support_tickets'\]"):
        model.predict_health(train[["account_id", "ctr"]])
    with pytest.raises(FeatureError, match="indicator 'ctr' must be numeric"):
        model.predict_health(train.assign(ctr="high"))
    with pytest.raises(KeyError, match="account 'nobody' has not been scored"):
        model.get_contributing_factors("nobody")


def test_telco_auc_on_a_stratified_split():
    from sklearn.model_selection import train_test_split

    from within.data.loaders import telco

    df = telco.load(needs_data("telco_customer_churn"))
    indicators = [c for c in df.columns if c not in ("customerID", "Churn")]
    train, test = train_test_split(df, test_size=0.2, stratify=df["Churn"], random_state=0)
    model = AccountHealthPredictor(indicators, id_column="customerID", model_type="logistic").fit(train, "Churn")
    p = model.predict_churn_risk(test)
    assert auc(p, test["Churn"]) > 0.83
    assert abs(p.mean() - test["Churn"].mean()) < 0.03
    factors = model.get_contributing_factors(test["customerID"].iloc[0])
    assert {f["indicator"] for f in factors} == set(indicators)  # one-hot columns summed to raw names
