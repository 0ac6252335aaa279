"""Account churn panel from the simulator's world: determinism, the stated formula, the panel's shape,
the link to the world's drift, and trailing_mean against a brute-force loop."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from within.data.accounts import CHURN_COEF, INDICATORS, AccountChurnSimulator, trailing_mean
from within.data.simulator import AdMarketSimulator

WORLD = {"n_accounts": 200, "campaigns_per_account": 2, "ad_groups_per_campaign": 1, "ads_per_ad_group": 1}


@pytest.fixture(scope="module")
def churn_sim() -> AccountChurnSimulator:
    return AccountChurnSimulator(AdMarketSimulator(seed=3, **WORLD), months=18)


def test_same_world_same_panel_and_another_seed_differs(churn_sim):
    again = AccountChurnSimulator(AdMarketSimulator(seed=3, **WORLD), months=18)
    pd.testing.assert_frame_equal(churn_sim.panel(), again.panel())
    other = AccountChurnSimulator(AdMarketSimulator(seed=4, **WORLD), months=18).panel()
    assert not np.allclose(other["spend_trend"].to_numpy()[:50], churn_sim.panel()["spend_trend"].to_numpy()[:50])


def test_churn_probability_is_the_stated_formula(churn_sim):
    p = churn_sim.panel()
    eta = churn_sim.c0 + sum(w * p[c] for c, w in CHURN_COEF.items())
    np.testing.assert_allclose(p["churn_probability"], expit(eta), rtol=1e-12)
    np.testing.assert_allclose(churn_sim.true_logit(p), eta, rtol=1e-12)
    # labels are Bernoulli draws of that probability: their count is within 4 binomial sd of its mean
    q = p["churn_probability"].to_numpy()
    assert abs(p["churned"].sum() - q.sum()) < 4 * np.sqrt((q * (1 - q)).sum())
    # the world's own levels: spend scales with the account's campaign budgets
    sim = churn_sim.sim
    budget = pd.Series(np.bincount(sim.account_of_campaign, weights=sim.campaign_budget), index=sim.account_ids)
    per_acc = p.groupby("account_id")["monthly_spend"].mean()
    assert np.corrcoef(np.log(per_acc), np.log(budget[per_acc.index]))[0, 1] > 0.8


def test_panel_stops_at_the_churn_month(churn_sim):
    p = churn_sim.panel()
    assert list(p.columns) == ["account_id", "month", *INDICATORS, "churn_probability", "churned"]
    for _, rows in p.groupby("account_id"):
        months = rows["month"].to_numpy()
        assert (np.diff(months) == 1).all() and months[0] == 0
        churned = rows["churned"].to_numpy()
        assert churned[:-1].sum() == 0  # only the last row may be a churn
        assert churned[-1] == 1 or months[-1] == churn_sim.months - 1
    snap = churn_sim.snapshot(5)
    assert snap["account_id"].is_unique and (snap["month"] == 5).all()
    with pytest.raises(ValueError, match=r"snapshot.month: must be in \[0, 17\], got 18"):
        churn_sim.snapshot(18)


def test_true_contributions_are_the_centred_terms(churn_sim):
    p = churn_sim.panel()
    tc = churn_sim.true_contributions(p)
    assert list(tc.columns) == list(CHURN_COEF)
    np.testing.assert_allclose(tc.mean(), 0.0, atol=1e-9)
    np.testing.assert_allclose(tc.sum(axis=1) + churn_sim.c0 + sum(w * p[c].mean() for c, w in CHURN_COEF.items()),
                               churn_sim.true_logit(p), rtol=1e-9)


def test_world_drift_moves_ctr_trend_at_the_drift_month():
    sim = AdMarketSimulator(seed=3, drift={"account_sd": 1.0, "start_frac": 0.5}, **WORLD)
    cs = AccountChurnSimulator(sim, months=12, trend_window=2)
    full = cs.panel(include_after_churn=True)
    at = full[full["month"] == 6].set_index("account_id")["ctr_trend"]
    shift = pd.Series(sim.drift_account, index=sim.account_ids)[at.index]
    # log ctr moves by about the logit shift at low CTR: the trend at the drift month tracks it
    assert np.corrcoef(at, shift)[0, 1] > 0.9
    before = full[full["month"] == 5].set_index("account_id")["ctr_trend"]
    assert abs(np.corrcoef(before, shift[before.index])[0, 1]) < 0.3


def test_bad_arguments_name_the_field():
    sim = AdMarketSimulator(seed=3, **WORLD)
    with pytest.raises(ValueError, match="AccountChurnSimulator.months: must be >= 2, got 1"):
        AccountChurnSimulator(sim, months=1)
    with pytest.raises(ValueError, match=r"monthly_churn: must be in \(0, 0.5\), got 0.7"):
        AccountChurnSimulator(sim, monthly_churn=0.7)
    with pytest.raises(TypeError, match="expected an AdMarketSimulator, got dict"):
        AccountChurnSimulator({"seed": 3})
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        trailing_mean(np.ones(3), np.zeros(3), 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-1e3, 1e3)), min_size=1, max_size=40), st.integers(1, 5))
def test_trailing_mean_matches_a_loop(rows, window):
    groups = np.array([g for g, _ in rows])
    values = np.array([v for _, v in rows])
    got = trailing_mean(values, groups, window)
    for i in range(len(rows)):
        prev = [values[j] for j in range(i) if groups[j] == groups[i]][-window:]
        want = np.mean(prev) if prev else values[i]
        assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-9)
