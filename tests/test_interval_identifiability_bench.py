"""benchmarks/interval_identifiability.py: the share of a true residual that field and pair effects see."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("interval_identifiability",
                                               ROOT / "benchmarks" / "interval_identifiability.py")
ii = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ii)


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
