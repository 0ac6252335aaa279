"""benchmarks/streaming_scale.py's summary: bracketed baselines and the speed along the largest epoch."""
from __future__ import annotations

import pytest

from benchmarks import streaming_scale as ss


def run(n: int, speed: float, pss: float, marks: list[list[float]] | None = None) -> dict:
    train = int(0.6 * n)
    return {"n": n, "train_rows": train, "samples_per_s": speed, "train_seconds": train / speed,
            "peak_pss_mb": pss, "main_maxrss_mb": pss, "marks": marks or []}


def steady_then_slow(n_train: int, speed: float, slow_after: int, factor: float) -> list[list[float]]:
    """Marks every 100k rows of an epoch at `speed` that runs `factor` times slower past `slow_after`."""
    marks, t = [[0, 0.0]], 0.0
    for rows in range(100_000, n_train + 1, 100_000):
        t += 100_000 / (speed if rows <= slow_after else speed * factor)
        marks.append([rows, t])
    return marks


def test_the_speed_ratio_is_against_the_mean_of_the_bracketing_baseline_runs():
    rows = [run(1_000_000, 20_000.0, 1000.0), run(10_000_000, 15_000.0, 1100.0), run(1_000_000, 10_000.0, 990.0)]
    out = ss.summarise(rows)
    assert out["baseline_runs"] == 2 and out["baseline_speeds"] == [20_000.0, 10_000.0]
    assert out["speed_ratio"] == pytest.approx(1.0)        # 15k against the mean of 20k and 10k
    assert out["memory_ratio"] == pytest.approx(1.1)       # against the first baseline run
    assert out["met"] is True
    assert ss.summarise(rows[:2])["speed_ratio"] == pytest.approx(0.75) and not ss.summarise(rows[:2])["met"]


def test_a_slowdown_along_the_epoch_shows_as_tail_against_head():
    flat = ss.summarise([run(1_000_000, 18_000.0, 1e3),
                         run(10_000_000, 18_000.0, 1e3, steady_then_slow(6_000_000, 18_000.0, 10**9, 1.0))])
    assert flat["tail_vs_head"] == pytest.approx(1.0) and flat["window_cv"] == pytest.approx(0.0, abs=1e-9)
    slowing = ss.summarise([run(1_000_000, 18_000.0, 1e3),
                            run(10_000_000, 15_000.0, 1e3, steady_then_slow(6_000_000, 18_000.0, 3_000_000, 0.5))])
    assert slowing["window_rows"] == 1_000_000
    assert slowing["tail_vs_head"] == pytest.approx(0.5)
    speeds = ss.window_speeds(steady_then_slow(400_000, 10_000.0, 200_000, 0.5))
    assert speeds == [(100_000, pytest.approx(10_000.0)), (200_000, pytest.approx(10_000.0)),
                      (300_000, pytest.approx(5_000.0)), (400_000, pytest.approx(5_000.0))]


def test_runs_without_marks_report_no_trend():
    out = ss.summarise([run(100_000, 1e4, 1e3), run(200_000, 1e4, 1e3)])
    assert out["tail_vs_head"] is None and out["window_cv"] is None

