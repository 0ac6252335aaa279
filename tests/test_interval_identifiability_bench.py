"""benchmarks/interval_identifiability.py: the share of a true residual that field and pair effects see."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import interval_identifiability as ii


def test_seen_share_is_whole_for_pair_effects_and_misses_a_three_way_effect():
    rng = np.random.default_rng(0)
    n = 60_000
    a, b, c = rng.integers(0, 300, n), rng.integers(0, 4, n), rng.integers(0, 4, n)
    ab = rng.normal(0, 0.4, (300, 4))
    abc = rng.normal(0, 0.4, (300, 4, 4))
    fields = {"a": a, "b": b, "c": c}
    pairwise = ab[a, b] + rng.normal(0, 0.3, 300)[a]
    seen = ii.seen_share(pairwise, fields)
    assert seen["seen_share"] == pytest.approx(1.0, abs=0.05)
    assert set(seen["top_components"]) >= {"a", "axb"}
    # an a x b x c effect is not a sum of pair effects: only rows of one (a, b, c) cell share it, and
    # the pair components explain it only in part, through those cells' pairs (measured 0.78)
    three_way = pairwise + abc[a, b, c]
    part = ii.seen_share(three_way, fields)
    pair_part = (0.16 + 0.09) / (0.16 + 0.09 + 0.16)
    assert pair_part - 0.05 < part["seen_share"] < 0.88
    # fields alone see the a effect and the a-level means of the others (measured 0.30)
    assert ii.seen_share(three_way, fields, pairs=False)["seen_share"] < 0.45


def test_partner_comparison_splits_shared_error_from_each_models_noise():
    # both scores carry the truth's signal z plus their own noise; the Berkson residual of each is
    # (1 - b) z - b n_k, so the errors share (1 - b)^2 var(z) with b = var z / (var z + var n) = 5/6
    rng = np.random.default_rng(1)
    n = 200_000
    z = rng.normal(0, np.sqrt(0.5), n)
    truth = -3.5 + z
    s_main, s_partner = z + rng.normal(0, np.sqrt(0.1), n), z + rng.normal(0, np.sqrt(0.1), n)
    y = (rng.random(n) < 1 / (1 + np.exp(-truth))).astype(float)
    keys = {"k": rng.integers(0, 500, n)}
    out = ii.partner_comparison(s_main, s_partner, truth, y, keys, {"k": keys["k"]}, weight_power=0.5)
    b = 0.5 / 0.6
    shared, own = (1 - b) ** 2 * 0.5, b**2 * 0.1
    assert out["shared_share"] == pytest.approx(shared / (shared + own), abs=0.06)
    assert out["var_run"] == pytest.approx(shared + own, rel=0.15)
    # averaging halves the noise part; what is left is still row-level, which one key cannot see
    assert out["var_average"] < out["var_run"]
    assert out["seen_share_average"] < 0.3


def test_sample_seed_of_reads_the_rows_seed_or_falls_back_to_the_world_seed():
    meta = {"config": {"data": {"source": {"seed": 7, "sample_seed": None}}}}
    assert ii.sample_seed_of(meta) == (7, 7)
    meta["config"]["data"]["source"]["sample_seed"] = 1007
    assert ii.sample_seed_of(meta) == (7, 1007)


@pytest.mark.parametrize("busy_units_have", ["larger effects", "smaller errors"])
def test_closed_indices_weighted_by_rows_are_unbiased_where_a_units_traffic_tracks_its_effect(busy_units_have):
    # the truth: a high bid buys traffic AND clicks; a model's error: busy ads had more training rows
    rng = np.random.default_rng(2)
    n_units = 400
    effect = rng.normal(0, 0.5, n_units)
    sign = 1.0 if busy_units_have == "larger effects" else -1.0
    traffic = np.exp(sign * 1.5 * np.abs(effect))
    n = 120_000
    a = rng.choice(n_units, n, p=traffic / traffic.sum())
    b = rng.integers(0, 4, n)
    x = effect[a] + np.array([0.0, 0.3, -0.2, 0.1])[b]
    fields = {"a": a, "b": b}
    var = x.var()
    # per row, the population weighting: unbiased
    assert ii.closed_index_variance(x, fields, row_weighted=True) == pytest.approx(var, rel=0.03)
    # per pair, a unit counts with the square of its rows, and so do the pair moments that
    # ProbabilityIntervals solves: the busy units' effects dominate, in either direction
    by_pairs = ii.closed_index_variance(x, fields, row_weighted=False)
    moments = ii.seen_share(x, fields)["seen_by_keys"]
    if sign > 0:
        assert by_pairs > 1.3 * var and moments > 1.3 * var
    else:
        assert by_pairs < 0.8 * var and moments < 0.8 * var
