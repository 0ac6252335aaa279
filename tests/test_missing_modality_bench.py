"""benchmarks/missing_modality.py: several seeds' runs in one file, with the mean AUC per cell."""
from __future__ import annotations

import pytest

from benchmarks import missing_modality as mm


def seed_run(seed: int, full: float, dropped: float) -> dict:
    return {"rows": 1000, "seed": seed, "auc": {"full": {"full": full, "no_text": full - 0.05},
                                                "dropped": {"full": dropped, "no_text": dropped - 0.01}}}


def test_combine_averages_each_cell_over_seeds_and_keeps_every_run():
    out = mm.combine([seed_run(7, 0.70, 0.69), seed_run(8, 0.72, 0.70)])
    assert out["seeds"] == [7, 8] and set(out["by_seed"]) == {"7", "8"}
    assert out["mean_auc"]["full"]["full"] == pytest.approx(0.71)
    assert out["dropped_minus_full_mean"]["full"] == pytest.approx(0.695 - 0.71)
    assert out["dropped_minus_full_mean"]["no_text"] == pytest.approx(0.685 - 0.66)
    md = mm.markdown(out)
    assert "| full | 7 | 0.7000 | 0.6500 |" in md and "| **dropped** | mean | **0.6950** | **0.6850** |" in md
