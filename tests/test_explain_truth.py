"""The simulator's true logit split into terms, and their exact field Shapley values (the yardstick
benchmarks/explain_truth.py holds a model's attributions against)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logit

from within.data.simulator import DEVICE_X_PLACEMENT, DEVICES, PLACEMENTS, AdMarketSimulator
from within.explain.truth import field_shapley, rank_agreement


@pytest.fixture(scope="module")
def sim() -> AdMarketSimulator:
    return AdMarketSimulator(seed=5, n_accounts=8, drift={"account_sd": 0.3, "region_sd": 0.2, "start_frac": 0.5})


@pytest.fixture(scope="module")
def frame(sim) -> pd.DataFrame:
    return sim.sample(4000).sample(frac=1.0, random_state=0)  # rows from the whole timeline


def test_terms_sum_to_the_true_logit_and_name_their_fields(sim, frame):
    terms = sim.true_logit_terms(frame)
    np.testing.assert_allclose(terms.sum(axis=1), sim.true_logit(frame), atol=1e-12)
    np.testing.assert_allclose(terms.sum(axis=1), logit(frame.true_ctr.to_numpy()), atol=1e-9)
    fields = terms.attrs["fields"]
    assert set(fields) == set(terms.columns)
    assert fields["age_x_topic"] == ["age_band", "headline", "description"]
    assert all(set(cols) <= set(frame.columns) for cols in fields.values())
    assert (terms.drift_account != 0).any() and (terms.drift_account == 0).any()  # drift only late
    assert terms.intercept.nunique() == 1 and terms.std()["main_image"] > 0.1


def test_a_term_reads_only_its_fields(sim, frame):
    """Swapping every other column leaves a term unchanged: what attrs['fields'] promises."""
    terms = sim.true_logit_terms(frame)
    shuffled = frame.sample(frac=1.0, random_state=1).reset_index(drop=True)
    for term in ("device_x_placement", "age_x_topic", "headline", "main_image"):
        mixed = shuffled.copy()
        for col in terms.attrs["fields"][term]:
            mixed[col] = frame[col].to_numpy()
        np.testing.assert_allclose(sim.true_logit_terms(mixed)[term].to_numpy(), terms[term].to_numpy(), atol=1e-12)


def test_unknown_values_and_missing_columns_are_named(sim, frame):
    with pytest.raises(ValueError, match=r"missing columns \['bid'\]"):
        sim.true_logit_terms(frame.drop(columns="bid"))
    bad = frame.head(3).copy()
    bad["placement"] = "billboard"
    with pytest.raises(ValueError, match="placement='billboard' is not in this world"):
        sim.true_logit_terms(bad)


def test_field_shapley_adds_up_and_splits_a_pure_interaction_evenly(sim, frame):
    rows, ref = frame.iloc[:150], frame.iloc[2000:2060]
    phi = field_shapley(sim.true_logit_terms, rows, ref)
    np.testing.assert_allclose(phi.sum(axis=1), sim.true_logit(rows) - sim.true_logit(ref).mean(), atol=1e-10)
    assert "campaign_id" in phi and "timestamp" in phi  # the truth's own fields, inputs of a model or not
    # a two-field term: Shapley gives each field its main effect plus half the rest
    table = np.asarray(DEVICE_X_PLACEMENT)
    d = pd.Index(DEVICES).get_indexer(rows.device.astype(object))
    p = pd.Index(PLACEMENTS).get_indexer(rows.placement.astype(object))
    rd = pd.Index(DEVICES).get_indexer(ref.device.astype(object))
    rp = pd.Index(PLACEMENTS).get_indexer(ref.placement.astype(object))
    g, v0 = table[d, p], table[rd, rp].mean()
    v_d, v_p = table[d][:, rp].mean(axis=1), table[:, p][rd].mean(axis=0)
    device_part = 0.5 * (v_d - v0) + 0.5 * (g - v_p)
    main = sim.true_logit_terms(rows)["device"] - sim.true_logit_terms(ref)["device"].mean()
    np.testing.assert_allclose(phi["device"], main.to_numpy() + device_part, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.floats(-3, 3), st.floats(-3, 3), st.integers(0, 10_000))
def test_field_shapley_efficiency_and_symmetry_on_a_product(a, b, seed):
    """term a*x*y plus b*(x + y): the values add up, and swapping x and y in the data swaps theirs."""
    rng = np.random.default_rng(seed)

    def terms(df: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({"xy": a * df.x * df.y, "x": b * df.x, "y": b * df.y})
        out.attrs["fields"] = {"xy": ["x", "y"], "x": ["x"], "y": ["y"]}
        return out

    rows = pd.DataFrame(rng.normal(size=(5, 2)), columns=["x", "y"])
    ref = pd.DataFrame(rng.normal(size=(7, 2)), columns=["x", "y"])
    phi = field_shapley(terms, rows, ref).reindex(columns=["x", "y"], fill_value=0.0)
    total = terms(rows).sum(axis=1) - terms(ref).sum(axis=1).mean()
    np.testing.assert_allclose(phi.sum(axis=1), total, atol=1e-9)
    swap = {"x": "y", "y": "x"}
    swapped = field_shapley(terms, rows.rename(columns=swap), ref.rename(columns=swap))
    swapped = swapped.reindex(columns=["x", "y"], fill_value=0.0)
    np.testing.assert_allclose(swapped["x"], phi["y"], atol=1e-9)
    np.testing.assert_allclose(swapped["y"], phi["x"], atol=1e-9)


def test_rank_agreement_over_common_fields_only():
    imp = pd.Series({"a": 3.0, "b": 2.0, "c": 1.0, "only_model": 9.0})
    truth = pd.Series({"a": 0.9, "b": 0.5, "c": 0.0, "only_truth": 1.0})
    assert rank_agreement(imp, truth) == {"spearman": pytest.approx(1.0), "n_fields": 3}
    assert rank_agreement(imp, -truth)["spearman"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="needs >= 3 common fields"):
        rank_agreement(imp[["a", "b"]], truth)
