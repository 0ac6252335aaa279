"""Calibrators and calibration metrics: invariants, round trips, fallbacks, and group-level gains."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from within.calibration import (
    GeospatialCalibrator,
    HierarchicalCalibrator,
    IdentityCalibrator,
    IsotonicCalibrator,
    PlattScaling,
    SplineCalibrator,
    TemperatureScaling,
    calibrator_from_dict,
    make_calibrator,
)
from within.calibration.metrics import (
    auc,
    binary_report,
    brier,
    calibration_ratio,
    ece,
    ece_true,
    field_rce,
    ks_error,
    logloss,
)

LEVELS = ("account_id", "campaign_id", "ad_group_id")


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --- shared synthetic data --------------------------------------------------------------------------
def grouped_data(n=60_000, seed=0):
    """Logits that miss account/campaign effects and are over-confident (temperature 1.3)."""
    rng = np.random.default_rng(seed)
    acc = rng.integers(0, 25, n)
    camp = rng.integers(0, 6, n)
    adg = rng.integers(0, 4, n)
    a_off = rng.normal(0, 0.7, 25)
    c_off = rng.normal(0, 0.3, (25, 6))
    base = rng.normal(-2.5, 1.0, n)
    y = rng.binomial(1, _sigmoid(base + a_off[acc] + c_off[acc, camp]))
    groups = {"account_id": acc, "campaign_id": camp, "ad_group_id": adg}
    return 1.3 * base, y, groups


def geo_data(n=60_000, n_cities=40, seed=1):
    rng = np.random.default_rng(seed)
    lat = rng.uniform(25, 48, n_cities)
    lon = rng.uniform(-120, -70, n_cities)
    dens = rng.lognormal(5, 1, n_cities)
    state = (lon // 10).astype(int)
    r_off = 0.6 * np.sin(lat / 4) + 0.5 * np.cos(lon / 6)
    city = rng.integers(0, n_cities, n)
    hour = rng.integers(0, 24, n)
    base = rng.normal(-2.5, 1.0, n)
    y = rng.binomial(1, _sigmoid(base + r_off[city] + 0.3 * np.sin(hour / 24 * 2 * np.pi)))
    regions = {"country": np.array(["US"] * n), "state": state[city], "city": city, "latitude": lat[city],
               "longitude": lon[city], "population_density": dens[city], "hour": hour}
    return base, y, regions, r_off


@pytest.fixture(scope="module")
def gdata():
    return grouped_data()


@pytest.fixture(scope="module")
def geodata():
    return geo_data()


@pytest.fixture(scope="module")
def calibrated():
    rng = np.random.default_rng(3)
    s = rng.normal(-2.0, 1.5, 100_000)
    return s, rng.binomial(1, _sigmoid(s))


def fitted_all(gdata, geodata):
    s, y, g = gdata
    gs, gy, reg, _ = geodata
    return [
        (IdentityCalibrator().fit(s, y), s, None),
        (TemperatureScaling().fit(s, y), s, None),
        (PlattScaling().fit(s, y), s, None),
        (IsotonicCalibrator().fit(s, y), s, None),
        (SplineCalibrator().fit(s, y), s, None),
        (HierarchicalCalibrator(hierarchy_levels=LEVELS).fit(s, y, g), s, g),
        (GeospatialCalibrator().fit(gs, gy, reg), gs, reg),
    ]


@pytest.fixture(scope="module")
def all_fitted(gdata, geodata):
    return fitted_all(gdata, geodata)


# --- metrics ------------------------------------------------------------------------------------------
def test_ece_small_on_calibrated_sample_and_large_when_shifted():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.5, 200_000)
    y = rng.binomial(1, p)
    assert ece(p, y) < 0.005
    assert ece(np.clip(p * 1.5, 0, 1), y) > 0.05


def test_ece_weighted_equals_expanded_rows():
    p = np.array([0.1, 0.4, 0.7])
    imps = np.array([10.0, 5.0, 4.0])
    clicks = np.array([2.0, 1.0, 3.0])
    rows_p = np.repeat(p, imps.astype(int))
    rows_y = np.concatenate([np.r_[np.ones(int(c)), np.zeros(int(w - c))] for c, w in zip(clicks, imps)])
    assert ece(p, clicks, n_bins=1, weight=imps) == pytest.approx(ece(rows_p, rows_y, n_bins=1))
    assert logloss(p, clicks, weight=imps) == pytest.approx(logloss(rows_p, rows_y))
    assert brier(p, clicks, weight=imps) == pytest.approx(brier(rows_p, rows_y))
    assert auc(p, clicks, weight=imps) == pytest.approx(auc(rows_p, rows_y))
    assert calibration_ratio(p, clicks, weight=imps) == pytest.approx(rows_p.sum() / rows_y.sum())


def test_ece_true_hand_example():
    p = np.array([0.1, 0.2, 0.6, 0.8])
    t = np.array([0.2, 0.2, 0.5, 0.5])
    # two equal-mass bins: {0.1, 0.2} vs truth mean 0.2 -> 0.05; {0.6, 0.8} vs 0.5 -> 0.2
    assert ece_true(p, t, n_bins=2) == pytest.approx(0.5 * 0.05 + 0.5 * 0.2)


def test_field_rce_hand_example():
    p = np.array([0.5, 0.5, 0.2, 0.2, 0.2])
    y = np.array([1, 0, 1, 1, 0])
    g = np.array(["a", "a", "b", "b", "b"])
    # group a: |1 - 1| = 0; group b: 3 * |2 - 0.6| / 2 = 2.1; divided by N = 5
    assert field_rce(p, y, g, eps=0.0) == pytest.approx(2.1 / 5)
    assert field_rce(p, y, g) == pytest.approx(2.1 / 5, rel=1e-5)


def test_ks_error_hand_example():
    p = np.array([0.2, 0.8])
    y = np.array([1, 0])
    # sorted cumulative p - y: 0.2 - 1 = -0.8, 1.0 - 1 = 0 -> max 0.8 / 2
    assert ks_error(p, y) == pytest.approx(0.4)


def test_binary_report_keys_and_truth():
    rng = np.random.default_rng(1)
    t = rng.uniform(0.05, 0.3, 5000)
    y = rng.binomial(1, t)
    rep = binary_report(t, y, groups={"region": rng.integers(0, 3, 5000)}, truth=t)
    assert {"auc", "logloss", "brier", "ece", "ks", "calib_ratio", "field_rce/region", "ece_true",
            "oracle_auc"} <= set(rep)
    assert rep["ece_true"] == 0.0
    assert rep["oracle_auc"] == pytest.approx(rep["auc"])


def test_metrics_reject_logits_with_clear_message():
    with pytest.raises(ValueError, match="pass sigmoid"):
        ece(np.array([2.0, -1.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="weight=impressions"):
        logloss(np.array([0.2, 0.3]), np.array([2, 0]))


# --- invariants -----------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-12, 12, allow_nan=False), min_size=2, max_size=40), st.integers(0, 6))
def test_every_calibrator_preserves_order_within_a_group(all_fitted, raw, which):
    cal, _, groups = all_fitted[which]
    s = np.sort(np.asarray(raw))
    n = s.size
    if groups is None:
        g = None
    else:  # one (seen) group for all rows, plus region columns where needed
        g = {k: np.repeat(np.asarray(v)[:1], n) for k, v in groups.items()}
    p = cal.transform(s, g)
    assert np.all(np.diff(p) >= -1e-12), type(cal).__name__
    if not isinstance(cal, IsotonicCalibrator):  # isotonic is a step map: ties allowed, no inversions
        distinct = np.diff(s) > 1e-3
        assert np.all(np.diff(p)[distinct & (p[1:] < 1 - 1e-9) & (p[:-1] > 1e-9)] > 0)


def test_json_round_trip_gives_identical_transform(all_fitted):
    for cal, s, g in all_fitted:
        d = json.loads(json.dumps(cal.to_dict()))
        assert d["type"] == cal.type_name
        back = calibrator_from_dict(d)
        assert type(back) is type(cal)
        np.testing.assert_array_equal(back.transform(s[:5000], _head(g, 5000)),
                                      cal.transform(s[:5000], _head(g, 5000)))


def _head(g, n):
    return None if g is None else {k: np.asarray(v)[:n] for k, v in g.items()}


def test_from_dict_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown calibrator type 'os.system'"):
        calibrator_from_dict({"type": "os.system", "params": {}, "state": {}})


@pytest.mark.parametrize("name,tol", [("none", 1e-12), ("temperature", 0.01), ("platt", 0.01),
                                      ("spline", 0.02), ("isotonic", 0.06)])
def test_near_identity_on_calibrated_scores(calibrated, name, tol):
    s, y = calibrated
    p = make_calibrator(name).fit(s, y).transform(s)
    assert np.max(np.abs(p - _sigmoid(s))) < tol


def test_hierarchical_near_identity_on_calibrated_scores(calibrated):
    s, y = calibrated
    rng = np.random.default_rng(5)
    g = {lv: rng.integers(0, 8, s.size) for lv in LEVELS}  # groups carry no signal
    p = HierarchicalCalibrator(hierarchy_levels=LEVELS).fit(s, y, g).transform(s, g)
    assert np.max(np.abs(p - _sigmoid(s))) < 0.02


def test_calibrators_fix_overconfidence():
    rng = np.random.default_rng(7)
    t = rng.normal(-2, 1, 50_000)
    y = rng.binomial(1, _sigmoid(t))
    s = 2.0 * t + 0.5
    for name in ("temperature", "platt", "isotonic", "spline"):
        cal = make_calibrator(name, **({"fit_bias": True} if name == "temperature" else {}))
        p = cal.fit(s, y).transform(s)
        assert ece(p, y) < 0.5 * ece(_sigmoid(s), y), name


def test_weighted_fit_matches_row_level_fit():
    rng = np.random.default_rng(2)
    s = np.repeat(np.linspace(-3, 1, 40), 50)
    y = rng.binomial(1, _sigmoid(0.5 * s))
    su, inv = np.unique(s, return_inverse=True)
    clicks, imps = np.bincount(inv, y), np.bincount(inv).astype(float)
    a = PlattScaling(smooth_targets=False).fit(s, y)
    b = PlattScaling(smooth_targets=False).fit(su, clicks, weight=imps)
    assert a.slope_ == pytest.approx(b.slope_, rel=1e-4)
    assert a.bias_ == pytest.approx(b.bias_, abs=1e-4)


# --- spline -----------------------------------------------------------------------------------------------
def test_spline_multiclass_rows_sum_to_one_and_improve_ks(tmp_path):
    rng = np.random.default_rng(4)
    n, k = 20_000, 4
    true_logits = rng.normal(0, 1.5, (n, k))
    pt = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = (pt.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    cal = SplineCalibrator().fit(2.5 * true_logits, y)
    p = cal.transform(2.5 * true_logits)
    assert p.shape == (n, k)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    params = cal.get_spline_parameters()
    assert len(params["splines"]) == k
    assert params["ks_error"] < 0.5 * params["ks_error_before"]
    back = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(back.transform(2.5 * true_logits[:100]), p[:100])


def test_spline_plot_and_parameters(tmp_path, calibrated):
    s, y = calibrated
    cal = SplineCalibrator(n_knots=6, knot_spacing="uniform").fit(s[:20_000], y[:20_000])
    out = cal.plot_calibration_curve(tmp_path / "rel.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = cal.plot_calibration_curve()  # no path: the figure itself
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3  # perfect, before, after
    par = cal.get_spline_parameters()
    assert len(par["splines"][0]["knots"]) == 6 and all(c >= 0 for c in par["splines"][0]["ispline_coef"])
    assert cal.ks_error_ == par["ks_error"] < 0.01


def test_spline_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="knot_spacing"):
        SplineCalibrator(knot_spacing="log")
    with pytest.raises(ValueError, match="y_true: multi-class labels"):
        SplineCalibrator().fit(np.zeros((10, 3)), np.full(10, 5))


# --- hierarchical ------------------------------------------------------------------------------------------
def test_hierarchical_halves_field_rce_vs_global_temperature(gdata):
    s, y, g = gdata
    base = TemperatureScaling(fit_bias=True).fit(s, y).transform(s)
    h = HierarchicalCalibrator(hierarchy_levels=LEVELS).fit(s, y, g)
    p = h.transform(s, g)
    before, after = field_rce(base, y, g["account_id"]), field_rce(p, y, g["account_id"])
    assert after <= 0.5 * before, (before, after)


def test_hierarchical_unseen_group_falls_back_to_parent(gdata):
    s, y, g = gdata
    h = HierarchicalCalibrator(hierarchy_levels=LEVELS).fit(s, y, g)
    x = np.array([-2.0, -1.0])
    seen_campaign = {"account_id": np.array([3, 3]), "campaign_id": np.array([2, 2]),
                     "ad_group_id": np.array([99, 99])}
    mapping = h.get_calibration_mapping()["levels"]["campaign_id"]["groups"]["3/2"]["total"]
    unseen_all = {lv: np.array(["new", "new"]) for lv in LEVELS}
    np.testing.assert_allclose(h.transform_logit(x, seen_campaign) - h.base_.transform_logit(x), mapping)
    np.testing.assert_allclose(h.transform(x, unseen_all), h.base_.transform(x))


def test_hierarchical_accepts_level_alias_and_names_missing_level(gdata):
    s, y, g = gdata
    h = HierarchicalCalibrator(hierarchy_levels=("account", "campaign")).fit(s[:5000], y[:5000], _head(g, 5000))
    assert h.transform(s[:3], _head(g, 3)).shape == (3,)
    with pytest.raises(ValueError, match="no level 'campaign'"):
        h.transform(s[:3], {"account": g["account_id"][:3]})


# --- geospatial -------------------------------------------------------------------------------------------
def test_geospatial_halves_field_rce_by_region(geodata):
    s, y, reg, r_off = geodata
    base = TemperatureScaling(fit_bias=True).fit(s, y).transform(s)
    geo = GeospatialCalibrator()
    p = geo.fit(s, y, reg).transform(s, reg)
    assert field_rce(p, y, reg["city"]) <= 0.5 * field_rce(base, y, reg["city"])
    assert field_rce(p, y, reg["hour"]) <= 0.5 * field_rce(base, y, reg["hour"])
    f = geo.get_region_factors()
    est = np.array([f[f"US/{st_}/{c}"]["offset"] for c, st_ in
                    sorted({(int(c), int(st_)) for c, st_ in zip(reg["city"], reg["state"])})])
    assert np.corrcoef(est, r_off)[0, 1] > 0.9


def _unseen_city_setup(geodata, strategy):
    s, y, reg, _ = geodata
    keep = reg["city"] != 7
    geo = GeospatialCalibrator(fallback_strategy=strategy, seasonal=False)
    geo.fit(s[keep], y[keep], {k: v[keep] for k, v in reg.items()})
    rows = np.flatnonzero(~keep)[:4]
    return geo, s[rows], {k: v[rows] for k, v in reg.items()}


def test_geospatial_unseen_region_fallbacks(geodata):
    geo, x, r = _unseen_city_setup(geodata, "global")
    np.testing.assert_allclose(geo.transform_logit(x, r), geo.base_.transform_logit(x))

    geo, x, r = _unseen_city_setup(geodata, "parent")
    state_total = geo.totals_[1][geo.paths_[1].get_indexer([("US", str(r["state"][0]))])[0]]
    np.testing.assert_allclose(geo.transform_logit(x, r) - geo.base_.transform_logit(x), state_total)

    geo, x, r = _unseen_city_setup(geodata, "neighbors")
    off = geo.transform_logit(x, r) - geo.base_.transform_logit(x)
    lo, hi = geo.totals_[-1].min(), geo.totals_[-1].max()
    assert np.all((off >= lo) & (off <= hi)) and np.ptp(off) < 1e-12  # one city, one kernel mean


def test_geospatial_sparse_regions_are_smoothed_and_map_plots(tmp_path, geodata):
    s, y, reg, _ = geodata
    geo = GeospatialCalibrator(min_samples_per_region=5000).fit(s[:30_000], y[:30_000], _head(reg, 30_000))
    f = geo.get_region_factors()
    assert any(v["smoothed"] for v in f.values())
    assert all(v["factor"] == pytest.approx(np.exp(v["offset"])) for v in f.values())
    out = geo.plot_region_map(tmp_path / "map.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = geo.plot_region_map()  # no path: the figure itself
    assert isinstance(fig, Figure) and len(fig.axes[0].collections[0].get_offsets()) == len(f)


def test_geospatial_and_hierarchical_take_the_spec_keywords(geodata, gdata):
    s, y, reg, _ = geodata
    s, y, reg = s[:20_000], y[:20_000], _head(reg, 20_000)
    by_position = GeospatialCalibrator().fit(s, y, reg)
    by_keyword = GeospatialCalibrator().fit(X=s, y=y, regions=reg)
    np.testing.assert_array_equal(by_keyword.transform(X=s, regions=reg), by_position.transform(s, reg))
    np.testing.assert_array_equal(by_position.transform(s, groups=reg), by_position.transform(s, reg))
    np.testing.assert_array_equal(GeospatialCalibrator().fit_transform(s, y, regions=reg), by_position.transform(s, reg))
    gs, gy, g = gdata
    h = HierarchicalCalibrator(hierarchy_levels=LEVELS)
    p = h.fit_transform(X=gs[:5000], y=gy[:5000], groups=_head(g, 5000))
    np.testing.assert_array_equal(h.transform(X=gs[:5000], groups=_head(g, 5000)), p)


def test_geospatial_missing_geo_column_is_named():
    with pytest.raises(ValueError, match="no 'city' column"):
        GeospatialCalibrator().fit(np.zeros(3), np.array([0, 1, 0]), {"state": np.array([1, 1, 2])})


def test_bad_labels_and_scores_are_named():
    with pytest.raises(ValueError, match="y: labels must be 0/1"):
        TemperatureScaling().fit(np.zeros(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="scores: non-finite logit at row 1"):
        PlattScaling().fit(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown calibrator 'sigmoid'"):
        make_calibrator("sigmoid")


def test_knn_distances_are_great_circle_km():
    from within.calibration.geospatial import _knn, haversine_km

    lat, lon = np.array([40.71, 34.05, 41.88, 29.76]), np.array([-74.01, -118.24, -87.63, -95.37])
    nb, dist = _knn(lat[:1], lon[:1], lat, lon, 2, self_index=np.array([0]))
    assert nb[0].tolist() == [2, 3]  # New York -> Chicago, then Houston
    np.testing.assert_allclose(dist[0], haversine_km(lat[0], lon[0], lat[[2, 3]], lon[[2, 3]]), rtol=1e-9)
    assert haversine_km(40.71, -74.01, 41.88, -87.63) == pytest.approx(1145, rel=0.01)


def test_spline_cross_validated_regularization_is_chosen_and_kept():
    rng = np.random.default_rng(5)
    s = rng.normal(-3.0, 1.0, 20_000)
    y = rng.binomial(1, 1 / (1 + np.exp(-(0.3 + 0.8 * s + 0.25 * np.sin(2 * s)))))
    cal = SplineCalibrator(regularization="cv").fit(s, y)
    assert set(cal.cv_scores_) == {f"{lam:g}" for lam in SplineCalibrator.CV_GRID}
    best = min(cal.cv_scores_.values())
    assert cal.cv_scores_[f"{cal.regularization_:g}"] == pytest.approx(best, rel=1e-9)
    # the CV choice fits as well as the best fixed weight refitted on all rows (in-sample deviance)
    fixed = SplineCalibrator(regularization=cal.regularization_).fit(s, y)
    np.testing.assert_allclose(cal.transform(s), fixed.transform(s), rtol=1e-10)
    back = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.regularization == "cv" and back.regularization_ == cal.regularization_
    np.testing.assert_array_equal(back.transform(s[:100]), cal.transform(s[:100]))
    with pytest.raises(ValueError, match="regularization must be a number >= 0 or 'cv'"):
        SplineCalibrator(regularization="auto")


def test_geospatial_asks_the_predictor_for_coordinates_density_and_hour():
    # CalibratedScoring.group_columns adds required_columns to the group fields: without them the
    # spatial smoothing and the seasonal term were silently skipped
    need = set(GeospatialCalibrator.required_columns)
    assert {"latitude", "longitude", "population_density", "hour"} <= need
