"""Fairness by demographic group: the spec option, the per-group metrics against hand computation,
aggregated rows, and the post-fit step's per-group calibration."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from tests.conftest import CONF
from tests.test_explain_fixtures import network_model, one_torch_thread, synthetic_spec  # noqa: F401
from within.calibration.metrics import auc, calibration_ratio, ece
from within.data.simulator import simulate
from within.explain.fairness import demographic_fields, fairness_metrics, fairness_report, plot_fairness
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureError, FeatureSpec
from within.postfit.context import PostfitContext
from within.postfit.steps import STEPS


# ---- the spec option ---------------------------------------------------------------------------
def test_demographic_marks_fields_in_the_shipped_specs():
    assert [f.name for f in synthetic_spec().demographic] == ["age_band", "gender"]
    kag = FeatureSpec.from_config(OmegaConf.load(CONF / "features" / "kag_conversion.yaml"))
    assert [f.name for f in kag.demographic] == ["age", "gender"]


def test_demographic_is_for_categorical_or_group_fields_only():
    with pytest.raises(FeatureError, match="feature 'income': demographic applies to categorical or group fields, "
                                           "not numeric; bucket the values"):
        FeatureSpec.from_config({"fields": [{"name": "income", "type": "numeric", "demographic": True}]})
    spec = FeatureSpec.from_config({"fields": [{"name": "g", "type": "group", "level": "g", "demographic": True}]})
    assert FeatureSpec.from_dict(spec.to_dict()).demographic[0].name == "g"


def test_demographic_changes_nothing_in_the_model_inputs():
    df = simulate(n=400, seed=2)
    marked = synthetic_spec()
    plain = FeatureSpec.from_dict({**marked.to_dict(), "fields": [
        {**f, "demographic": False} for f in marked.to_dict()["fields"]]})
    a, b = FeatureProcessor(marked).fit(df), FeatureProcessor(plain).fit(df)
    assert a.input_dim == b.input_dim
    ta, tb = a.transform(df), b.transform(df)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


# ---- the metrics -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 6000
    g = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    p = np.clip(rng.beta(2, 30, n) * np.where(g == "c", 1.8, 1.0), 1e-4, 0.99)
    y = (rng.random(n) < p * np.where(g == "b", 0.6, 1.0)).astype(float)  # b over-predicted
    return pd.DataFrame({"p": p, "y": y, "g": g, "h": rng.choice(["x", "y"], n)})


def test_group_metrics_match_within_metrics_and_hand_computed_differences(scored):
    rep = fairness_metrics(scored.p, scored.y, {"g": scored.g, "h": scored.h}, n_bins=10)
    threshold = scored.y.mean()
    assert rep["threshold"] == pytest.approx(threshold) and "0.5 cut" in rep["threshold_rule"]
    groups = rep["fields"]["g"]["groups"]
    for name, sub in scored.groupby("g"):
        m = groups[name]
        assert m["auc"] == pytest.approx(auc(sub.p, sub.y))
        assert m["ece"] == pytest.approx(ece(sub.p, sub.y, n_bins=10))
        assert m["calibration_ratio"] == pytest.approx(calibration_ratio(sub.p, sub.y))
        assert m["mean_score"] == pytest.approx(sub.p.mean()) and m["rows"] == len(sub)
    assert groups["b"]["calibration_ratio"] > 1.3  # the over-predicted group shows
    selected = (scored.p > threshold).groupby(scored.g).mean()
    assert rep["fields"]["g"]["demographic_parity_difference"] == pytest.approx(selected.max() - selected.min())
    tpr = scored[scored.y == 1].assign(s=lambda d: d.p > threshold).groupby("g").s.mean()
    fpr = scored[scored.y == 0].assign(s=lambda d: d.p > threshold).groupby("g").s.mean()
    eo = max(tpr.max() - tpr.min(), fpr.max() - fpr.min())
    assert rep["fields"]["g"]["equalized_odds_difference"] == pytest.approx(eo)
    assert rep["fields"]["g"]["difference"]["calibration_ratio"] == pytest.approx(
        max(m["calibration_ratio"] for m in groups.values()) - min(m["calibration_ratio"] for m in groups.values()))
    assert rep["worst_group"]["ece"] == max(m["ece"] for f in rep["fields"].values() for m in f["groups"].values())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 0.3))
def test_aggregated_rows_report_like_their_expanded_rows(seed, threshold):
    """Clicks out of impressions per row give the same rates and differences as one row per impression."""
    rng = np.random.default_rng(seed)
    n = 40
    imps = rng.integers(1, 6, n)
    clicks = rng.binomial(imps, 0.15)
    p = rng.uniform(0.02, 0.4, n)
    g = rng.choice(["u", "v"], n)
    agg = fairness_metrics(p, clicks, {"g": g}, weight=imps, threshold=threshold)
    rows = np.repeat(np.arange(n), imps)
    y = np.concatenate([np.r_[np.ones(c), np.zeros(i - c)] for c, i in zip(clicks, imps)])
    flat = fairness_metrics(p[rows], y, {"g": g[rows]}, threshold=threshold)
    for key in ("demographic_parity_difference", "equalized_odds_difference"):
        assert agg["fields"]["g"][key] == pytest.approx(flat["fields"]["g"][key], abs=1e-12)
    for grp, m in agg["fields"]["g"]["groups"].items():
        for key in ("calibration_ratio", "mean_score", "observed_ctr", "impressions", "clicks"):
            assert m[key] == pytest.approx(flat["fields"]["g"]["groups"][grp][key]), key
        if np.isfinite(m["auc"]):
            assert m["auc"] == pytest.approx(flat["fields"]["g"]["groups"][grp]["auc"])


def test_fairness_errors_name_the_fix(scored):
    spec = FeatureSpec.from_config({"fields": [{"name": "g", "type": "categorical"}]})
    with pytest.raises(ValueError, match="marks no field demographic; add `demographic: true`"):
        demographic_fields(spec)
    with pytest.raises(ValueError, match=r"fairness.fields: \['age'\] are not fields"):
        demographic_fields(spec, ["age"])
    with pytest.raises(ValueError, match="fairness.threshold: must be a probability in \\(0, 1\\), got 2"):
        fairness_metrics(scored.p, scored.y, {"g": scored.g}, threshold=2)
    with pytest.raises(ValueError, match=r"sensitive\['g'\] has 3 values for 6000 rows"):
        fairness_metrics(scored.p, scored.y, {"g": scored.g[:3]})


# ---- a model, the post-fit step ----------------------------------------------------------------
@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    """Strong age and gender effects (main_effect_scale=3): a model blind to them is off per group."""
    df = simulate(n=24_000, seed=4, main_effect_scale=3.0).sample(frac=1.0, random_state=0).reset_index(drop=True)
    return {"train": df.iloc[:4000], "val": df.iloc[4000:8000], "calib": df.iloc[8000:16000],
            "test": df.iloc[16000:]}


@pytest.fixture(scope="module")
def blind_model(frames):
    """Logit = a constant: random network with a zero head and zero wide term."""
    model = network_model(frames["train"], synthetic_spec(), seed=0)
    torch.nn.init.zeros_(model.net.head.weight)
    return model


def test_fairness_report_for_a_model(blind_model, frames, tmp_path):
    rep = fairness_report(blind_model, frames["test"])
    assert set(rep["fields"]) == {"age_band", "gender"} and "ece_true" in rep["overall"]
    assert set(rep["fields"]["gender"]["groups"]) == {"female", "male", "unknown"}
    assert rep["fields"]["age_band"]["demographic_parity_difference"] == 0.0  # one score for everyone
    assert plot_fairness(rep, tmp_path / "f.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"the frame lacks columns \['gender'\]"):
        fairness_report(blind_model, frames["test"].drop(columns="gender"))


def test_fairness_step_lowers_the_worst_group_ece(blind_model, frames, tmp_path):
    ctx = PostfitContext(model=blind_model, frames=frames, out_dir=tmp_path, config={"fairness": {"n_bins": 10}})
    assert STEPS["fairness"].name == "fairness"
    STEPS["fairness"]().run(ctx)
    report = json.loads((tmp_path / "report" / "fairness.json").read_text())
    assert (tmp_path / "report" / "fairness.png").stat().st_size > 10_000
    assert report["calibration_split"] == "calib" and report["split"] == "test"
    assert report["per_group_calibration"]["installed_in_bundle"] is False
    assert set(report["per_group_calibration"]["mapping"]["levels"]) == {"age_band", "gender"}
    m = ctx.metrics
    assert m["fairness/worst_group_ece_after"] < 0.5 * m["fairness/worst_group_ece"]
    assert m["fairness/same_group_ece_after"] <= m["fairness/worst_group_ece_after"]
    effect = report["effect"]["age_band"]
    for group in ("18-24", "55+"):  # the largest true effects, +0.9 and -1.05 logits at scale 3
        e = effect[group]
        assert abs(e["calibration_ratio_after"] - 1) < 0.5 * abs(e["calibration_ratio_before"] - 1)
        assert e["ece_true_after"] < e["ece_true_before"]
    assert "fairness/gender/equalized_odds_difference" in m and ctx.metadata["fairness"]["fields"] == ["age_band",
                                                                                                       "gender"]
