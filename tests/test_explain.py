"""explain / feature_importance: raw field names, the logit scale, additivity, the exact wide term,
the raw-field path for models without a network, plots, and the attention view."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_explain_fixtures import known_effects_frame, network_model, one_torch_thread, synthetic_spec  # noqa: F401
from within.data.simulator import simulate
from within.explain import Explanation, explain, feature_importance
from within.explain.attention import attention_view
from within.explain.plots import plot_importance, plot_waterfall


@pytest.fixture(scope="module")
def ads() -> pd.DataFrame:
    return simulate(n=1500, seed=3).sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def model(ads):
    m = network_model(ads, synthetic_spec(), seed=1)
    torch.nn.init.normal_(m.net.wide.weight, std=0.3)
    torch.nn.init.normal_(m.net.head.weight, std=0.5)  # the head starts small: give the deep part a say
    return m


@pytest.fixture(scope="module")
def explained(model, ads) -> Explanation:
    return explain(model, ads.iloc[:12], ads.iloc[500:800], nsamples=300)


def test_attributions_name_raw_fields_on_the_logit_scale(model, ads, explained):
    spec = model.processor.spec
    inputs = {f.name for f in spec.fields if f.type != "group" or f.embed}
    assert set(explained.feature_names) == inputs  # embed=false groups are no input; presence never varied
    assert explained.method == "gradient" and explained.scale == "logit"
    np.testing.assert_allclose(explained.logits, model.predict_logits(ads.iloc[:12]), atol=1e-6)
    modality = dict(zip(explained.feature_names, explained.modalities))
    assert modality["headline"] == "text" and modality["main_image"] == "image" and modality["bid"] == "tabular"
    summary = explained.modality_summary()
    assert list(summary.columns) == ["image", "tabular", "text"]
    np.testing.assert_allclose(summary.sum(axis=1), explained.values.sum(axis=1), atol=1e-12)


def test_expected_gradients_add_up_to_the_logit(explained):
    spread = np.abs(explained.logits - explained.base_value).mean()
    assert spread > 0.2
    assert np.abs(explained.additivity_gap).max() < 0.03 * spread + 0.01


def test_the_wide_term_is_attributed_exactly(ads):
    """With the deep head zeroed the logit is bias + wide terms: attributions are value - reference mean."""
    m = network_model(ads, synthetic_spec(), seed=2)
    torch.nn.init.normal_(m.net.wide.weight, std=0.4)
    torch.nn.init.zeros_(m.net.head.weight)
    rows, ref = ads.iloc[:6], ads.iloc[600:700]
    e = explain(m, rows, ref, nsamples=20)
    np.testing.assert_allclose(e.additivity_gap, 0.0, atol=1e-5)
    arrays = m.processor.transform(rows)
    ref_arrays = m.processor.transform(ref)
    w = m.net.wide.weight.detach().double().numpy()[:, 0]
    offsets = m.net.wide_offsets.numpy()
    for i, f in enumerate(m.processor.spec.categorical):
        want = w[arrays["cat"][:, i] + offsets[i]] - w[ref_arrays["cat"][:, i] + offsets[i]].mean()
        np.testing.assert_allclose(e.to_frame()[f.name], want, atol=1e-6)
    assert np.abs(e.to_frame()[["headline", "main_image", "bid"]].to_numpy()).max() < 1e-6


@pytest.mark.slow  # ~30 s on the shared machine: numba compiles shap's masker, the processor runs per call
def test_permutation_path_is_exactly_additive_and_agrees_with_gradients(model, ads, explained):
    e = explain(model, ads.iloc[:2], ads.iloc[500:800], method="permutation", permutations=2, background_size=30)
    np.testing.assert_allclose(e.additivity_gap, 0.0, atol=1e-5)
    assert e.method == "permutation" and {"campaign_id", "ad_group_id"} <= set(e.feature_names)
    g = explain(model, ads.iloc[:2], ads.iloc[500:800], nsamples=300, background_size=30)
    common = g.feature_names
    corr = np.corrcoef(e.to_frame()[common].to_numpy().ravel(), g.to_frame().to_numpy().ravel())[0, 1]
    assert corr > 0.95


class LinearOnRawFields:
    """A model without a network: logit = 2 * x_strong + colour effect (what DynamicLinear exposes)."""

    def __init__(self, spec):
        self.spec = spec

    def predict_logits(self, X):
        df = self.spec.records_to_frame(X)
        return 2.0 * df.x_strong.to_numpy(float) + df.colour.map({"red": 1.0, "green": 0.0, "blue": -1.0}).to_numpy()


def test_a_model_with_only_predict_logits_gets_exact_raw_field_attributions():
    df, spec = known_effects_frame(300)
    model = LinearOnRawFields(spec)
    ref = df.iloc[100:200]
    e = explain(model, df.iloc[:5], ref)
    assert e.method == "permutation" and e.feature_names == ["x_strong", "x_noise", "colour", "shape"]
    frame = e.to_frame()
    np.testing.assert_allclose(frame.x_strong, 2.0 * (df.x_strong[:5] - ref.x_strong.mean()), atol=1e-9)
    np.testing.assert_allclose(frame[["x_noise", "shape"]], 0.0, atol=1e-12)
    np.testing.assert_allclose(e.additivity_gap, 0.0, atol=1e-9)
    one = explain(model, df.iloc[0].to_dict(), ref)  # one ad as a dict
    assert len(one) == 1 and one.row(0)["attributions"]["x_strong"] == pytest.approx(frame.x_strong[0])


def test_feature_importance_ranks_the_fields_by_their_effect():
    df, spec = known_effects_frame(4000)
    model = network_model(df, spec, seed=0, train_steps=200, use_cross_modal=False)
    imp = feature_importance(model, df, n_rows_explained=80, nsamples=100, background_size=100)
    assert list(imp.importance.index[:2]) == ["x_strong", "colour"]
    assert imp.importance["x_strong"] > 0.6 and imp.importance["x_noise"] < 0.25 * imp.importance["colour"]
    processed = model.processor.transform(df.iloc[:1000])  # a bundle's processed reference sample
    imp2 = feature_importance(model, processed, n_rows_explained=80, nsamples=100, background_size=100)
    assert list(imp2.importance.index[:2]) == ["x_strong", "colour"]
    data = imp.to_dict()
    assert data["scale"] == "logit" and data["modalities"]["tabular"] > 0 and json.dumps(data)


def test_explanations_serialise_and_plot(model, ads, explained, tmp_path):
    data = explained.to_dict()
    assert json.loads(json.dumps(data))["scale"] == "logit" and "logit scale" in data["note"]
    row = data["rows"][0]
    values = list(row["attributions"].values())
    assert values == sorted(values, key=abs, reverse=True)
    assert row["logit"] == pytest.approx(row["base_value"] + sum(values) + row["additivity_gap"])
    imp = feature_importance(model, ads.iloc[:300], n_rows_explained=20, nsamples=30)
    assert plot_importance(imp, tmp_path / "importance.png").stat().st_size > 5000
    assert plot_waterfall(explained, tmp_path / "row.png", row=2).stat().st_size > 5000
    with pytest.raises(IndexError, match="row 12 out of range for 12 explained rows"):
        plot_waterfall(explained, tmp_path / "x.png", row=12)


def test_a_missing_modality_shows_as_a_presence_entry(model, ads):
    rows = ads.iloc[:4].copy()
    rows["headline"] = ""
    rows["description"] = ""
    e = explain(model, rows, ads.iloc[500:700], nsamples=50)
    assert "text:present" in e.feature_names and e.modalities[e.feature_names.index("text:present")] == "text"
    assert np.abs(e.to_frame()["text:present"]).max() > 0


def test_attention_view_is_labelled_not_an_attribution(model, ads):
    view = attention_view(model, ads.iloc[:8])
    assert "NOT an attribution" in view["note"] and view["modalities"] == ["tabular", "text", "image"]
    att = np.asarray(view["mean_attention"])
    assert att.shape == (3, 3) and np.all(att.sum(axis=1) <= 1 + 1e-6)
    assert np.asarray(view["per_row"]).shape == (8, 3, 3)
    assert set(view["pooling_weights"]) == {"cls", "tabular", "text", "image"}


def test_errors_name_the_argument_and_the_fix(model, ads):
    df, spec = known_effects_frame(50)
    with pytest.raises(ValueError, match=r"method 'shap' is not one of \['auto', 'gradient', 'permutation'\]"):
        explain(model, ads.iloc[:2], ads.iloc[:50], method="shap")
    with pytest.raises(ValueError, match="method='gradient' needs a network model.*use method='permutation'"):
        explain(LinearOnRawFields(spec), df.iloc[:2], df, method="gradient")
    processed = model.processor.transform(ads.iloc[:50])
    with pytest.raises(ValueError, match="reference must be raw rows.*processed arrays cannot"):
        explain(model, ads.iloc[:2], processed, method="permutation")
    with pytest.raises(TypeError, match="has no predict_logits"):
        explain(object(), ads.iloc[:2], ads.iloc[:50])
    with pytest.raises(ValueError, match="nsamples must be >= 1, got 0"):
        explain(model, ads.iloc[:2], ads.iloc[:50], nsamples=0)
    with pytest.raises(ValueError, match=r"fields \['colour'\] are missing from X or the reference"):
        explain(LinearOnRawFields(spec), df.drop(columns="colour").iloc[:2], df)


def test_grouped_fields_add_their_attributions():
    e = Explanation(values=np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 1.0, 0.0]]),
                    feature_names=["lat", "lon", "headline", "city"], modalities=["tabular", "tabular", "text", "tabular"],
                    base_value=0.1, logits=np.array([10.1, 1.1]), method="permutation")
    g = e.grouped({"region": ["lat", "lon", "city"]})
    assert g.feature_names == ["region", "headline"] and g.modalities == ["tabular", "text"]
    np.testing.assert_allclose(g.values, [[7.0, 3.0], [0.0, 1.0]])
    np.testing.assert_allclose(g.additivity_gap, e.additivity_gap)
    with pytest.raises(ValueError, match=r"groups\['x'\]: fields \['lat', 'headline'\] span modalities"):
        e.grouped({"x": ["lat", "headline"]})
    with pytest.raises(ValueError, match="unknown or in two groups"):
        e.grouped({"a": ["lat"], "b": ["lat", "lon"]})


def test_an_ensemble_of_networks_is_explained_by_its_members_gradients(model, ads):
    """A mean (or weighted) ensemble's logit is linear in its members', so are its attributions: the
    gradient path runs per member (not the permutation explainer's many model calls per row)."""
    from within.models.ensemble import CalibratedEnsemble

    other = network_model(ads, synthetic_spec(), seed=2)
    rows, reference = ads.iloc[:6], ads.iloc[500:700]
    ensemble = CalibratedEnsemble([model, other], aggregation_method="mean")
    got = explain(ensemble, rows, reference, nsamples=100)
    parts = [explain(m, rows, reference, method="gradient", nsamples=100) for m in (model, other)]
    assert got.method == "gradient" and "averaged" in got.method_note
    np.testing.assert_allclose(got.values, (parts[0].values + parts[1].values) / 2, atol=1e-12)
    np.testing.assert_allclose(got.logits, ensemble.predict_logits(rows), atol=1e-5)
    assert np.abs(got.additivity_gap).max() <= max(np.abs(p.additivity_gap).max() for p in parts) + 1e-9
    median = CalibratedEnsemble([model, other], aggregation_method="median")
    assert explain(median, rows.iloc[:2], reference.iloc[:50], permutations=2).method == "permutation"
