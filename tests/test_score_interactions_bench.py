"""benchmarks/score_interactions.py: label-free superset importance of a score's interactions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks import score_interactions as si


def test_superset_importance_finds_a_three_way_component_and_nothing_above_it():
    rng = np.random.default_rng(0)
    n = 40_000
    cols = ["a", "b", "c", "d"]
    base, donor = (pd.DataFrame(rng.normal(size=(n, 4)), columns=cols) for _ in range(2))
    f = lambda df: 2 * df.a + df.a * df.b + 0.5 * df.a * df.b * df.c + 0.3 * df.d
    imp = si.superset_importance(f, base, {c: donor for c in cols}, {c: [c] for c in cols}, max_order=4)
    # a x b x c has variance 0.25; a x b carries its own 1.0 plus that
    assert imp[3]["by_set"]["a x b x c"] == pytest.approx(0.25, rel=0.1)
    assert imp[2]["by_set"]["a x b"] == pytest.approx(1.25, rel=0.1)
    # sets with d: no component involves d with anything, so the alternating sum cancels exactly
    assert imp[2]["by_set"]["a x d"] == pytest.approx(0.0, abs=1e-20)
    assert imp[3]["by_set"]["a x b x d"] == pytest.approx(0.0, abs=1e-20)
    assert imp[4]["total"] == pytest.approx(0.0, abs=1e-20)
    ho = si.high_order_variance(imp)
    assert ho["order3plus"] == pytest.approx(0.25, rel=0.1) and ho["order3plus_upper"] >= ho["order3plus"]
