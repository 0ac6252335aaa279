"""The simulator's performance series: same world, deterministic, consistent counts, labelled anomalies
that really move the series, and errors that name the knob."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from within.data.performance import AFFECTED, KINDS, generate_performance
from within.data.simulator import DEVICES, AdMarketSimulator

KNOBS = {"days": 70, "n_anomalies": 5, "warmup": 20, "pilot_rows": 30_000}


@pytest.fixture(scope="module")
def sim():
    return AdMarketSimulator(seed=5, n_accounts=6)


@pytest.fixture(scope="module")
def data(sim):
    return generate_performance(sim, **KNOBS)


def test_columns_world_and_counts(sim, data):
    series, _ = data
    assert list(series.columns) == ["timestamp", "account_id", "campaign_id", "country", "state", "device",
                                    "impressions", "clicks", "conversions", "spend", "ctr", "cvr", "cpc"]
    # the simulator's own accounts, campaigns, devices, and states of each campaign's country
    assert set(series["account_id"]) == set(sim.account_ids)
    assert set(series["campaign_id"]) == set(sim.campaign_ids)
    assert set(series["device"]) == set(DEVICES)
    country_of = dict(zip(sim.campaign_ids, sim.country_names[sim.campaign_country]))
    assert (series["country"] == series["campaign_id"].map(country_of)).all()
    assert series["timestamp"].nunique() == KNOBS["days"]
    assert (series["clicks"] <= series["impressions"]).all() and (series["conversions"] <= series["clicks"]).all()
    clicked = series["clicks"] > 0
    np.testing.assert_allclose(series.loc[clicked, "cpc"], series.loc[clicked, "spend"] / series.loc[clicked, "clicks"])
    assert (series.loc[~clicked, "spend"] == 0).all()
    overall_ctr = series["clicks"].sum() / series["impressions"].sum()
    assert 0.5 * sim.knobs["mean_ctr"] < overall_ctr < 2 * sim.knobs["mean_ctr"]


def test_deterministic(sim, data):
    again = generate_performance(sim, **KNOBS)
    pd.testing.assert_frame_equal(again[0], data[0])
    pd.testing.assert_frame_equal(again[1], data[1])


def test_anomalies_table(data):
    series, anomalies = data
    assert len(anomalies) == KNOBS["n_anomalies"] and anomalies["account_id"].is_unique
    assert set(anomalies["kind"]) <= set(KINDS)
    assert (anomalies["start"] >= series["timestamp"].min() + pd.Timedelta(days=KNOBS["warmup"])).all()
    assert (anomalies["end"] >= anomalies["start"]).all() and (anomalies["end"] < series["timestamp"].max()).all()
    for row in anomalies.itertuples():
        assert row.affected == ",".join(AFFECTED[row.metric])
        assert row.direction == ("positive" if row.multiplier > 1 else "negative")
        assert (row.kind != "spike" or row.direction == "positive") and (row.kind != "drop" or row.direction == "negative")
        assert row.segment_share >= 0.25 and (row.multiplier >= 0.2 or row.direction == "positive")


def test_injected_anomalies_move_the_account_series(sim):
    """Each labelled anomaly moves its driver metric in its segment by its multiplier (noise aside)."""
    series, anomalies = generate_performance(sim, days=70, n_anomalies=6, warmup=20, pilot_rows=30_000,
                                             kinds=["level_shift"], effect_range=[0.5, 0.6])
    for row in anomalies.itertuples():
        sel = series["account_id"] == row.account_id
        for col in ("campaign_id", "state", "device"):
            value = getattr(row, col)
            if value is not None:
                sel &= series[col] == value
        seg = series[sel]
        during = seg[(seg["timestamp"] >= row.start) & (seg["timestamp"] <= row.end)]
        before = seg[(seg["timestamp"] < row.start) & (seg["timestamp"] >= row.start - pd.Timedelta(days=14))]

        def level(frame, row=row):
            if row.metric == "impressions":
                return frame.groupby("timestamp")["impressions"].sum().mean()
            num, den = {"ctr": ("clicks", "impressions"), "cvr": ("conversions", "clicks"),
                        "cpc": ("spend", "clicks")}[row.metric]
            return frame[num].sum() / frame[den].sum()

        ratio = level(during) / level(before)
        assert ratio == pytest.approx(row.multiplier, rel=0.15), row


def test_hourly_and_coarser_breakdown(sim):
    series, anomalies = generate_performance(sim, days=10, freq="h", breakdown=["device"], n_anomalies=2,
                                             warmup=48, pilot_rows=30_000)
    assert series["timestamp"].nunique() == 240
    assert list(series.columns[:3]) == ["timestamp", "account_id", "device"]
    by_hour = series.groupby(series["timestamp"].dt.hour)["impressions"].sum()
    assert by_hour.idxmax() in (19, 20, 21) and by_hour.idxmin() in (7, 8, 9)  # the simulator's evening peak
    assert anomalies["campaign_id"].isna().all() and anomalies["state"].isna().all()


@pytest.mark.parametrize("knobs, message", [
    ({"freq": "w"}, "generate_performance.freq: must be 'D' (daily) or 'h' (hourly), got 'w'"),
    ({"breakdown": ["city"]}, "generate_performance.breakdown: ['city'] not in"),
    ({"kinds": ["outage"]}, "generate_performance.kinds: ['outage'] must be a non-empty subset of"),
    ({"n_anomalies": 99}, "generate_performance.n_anomalies: at most one per account (6), got 99"),
    ({"dayz": 3}, "generate_performance: unknown arguments ['dayz']"),
])
def test_bad_knobs_name_the_field(sim, knobs, message):
    with pytest.raises(ValueError) as err:
        generate_performance(sim, pilot_rows=30_000, **knobs)
    assert message in str(err.value)
