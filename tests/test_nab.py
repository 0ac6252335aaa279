"""NAB scoring: hand-worked cases, sweep/threshold invariants, and NAB's published per-file results."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import DATA_DIR, needs_data
from within.data.loaders import nab as nab_data
from within.monitoring import nab


def _sig(y: float) -> float:  # the paper's scaled sigmoid, written out independently
    return -1.0 if y > 3 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


# One series of 100 rows, probation 15 rows, one window at rows 40..49 (width 10).
FILE = nab.ScoringFile("toy", 100, ((40, 49),))


def _flags(*rows: int, n: int = 100) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[list(rows)] = True
    return out


@pytest.mark.parametrize(
    "rows, expected",
    [
        ((), -1.0),                                          # missed window
        ((40,), 1.0),                                        # first row of the window earns A_TP exactly
        ((49,), _sig(-0.1) / _sig(-1.0)),                    # last row: 0.2482
        ((42, 45), _sig(-0.8) / _sig(-1.0)),                 # only the earliest detection counts: 0.9771
        ((20,), -1.0 - 0.11),                                # FP before any window costs A_FP, plus the miss
        ((10,), -1.0),                                       # inside the probationary period: ignored
        ((50,), -1.0 + 0.11 * _sig(1 / 9)),                  # FP right after the window costs little
        ((59,), -1.0 + 0.11 * _sig(10 / 9)),                 # ... and more further away
        ((99,), -1.0 + 0.11 * _sig(50 / 9)),                 # beyond 3 window widths: the full A_FP
        ((40, 60, 61), 1.0 + 0.11 * (_sig(11 / 9) + _sig(12 / 9))),  # every FP row counts
    ],
)
def test_hand_worked_standard_profile(rows, expected):
    got = nab.score_flags(FILE, _flags(*rows), "standard")
    assert got.score == pytest.approx(expected, abs=1e-12)


def test_hand_worked_literals_and_counts():
    assert nab.score_flags(FILE, _flags(49), "standard").score == pytest.approx(0.24824, abs=1e-5)
    assert nab.score_flags(FILE, _flags(42, 45), "standard").score == pytest.approx(0.97711, abs=1e-5)
    r = nab.score_flags(FILE, _flags(10, 20, 42, 45), "standard")
    # counts are per scored row: 85 rows after probation, 10 of them in the window
    assert (r.tp, r.fp, r.fn, r.tn, r.total) == (2, 1, 8, 74, 85)
    assert r.detected_windows == 1 and r.windows == 1


def test_profiles_weigh_misses_and_false_alarms():
    assert nab.score_flags(FILE, _flags(), "reward_low_FN_rate").score == -2.0
    assert nab.score_flags(FILE, _flags(20, 40), "reward_low_FP_rate").score == pytest.approx(1.0 - 0.22)
    assert nab.probationary_length(1624) == 243 and nab.probationary_length(22695) == 750


def test_profiles_json_matches_builtin():
    path = needs_data("nab_realAdExchange", "labels", "profiles.json")
    assert nab.profiles_from_json(json.loads(path.read_text())) == nab.PROFILES


def test_normalisation_null_and_perfect():
    files = [FILE, nab.ScoringFile("two", 200, ((50, 59), (120, 139)))]
    assert nab.null_score(files, "standard") == -3.0 and nab.perfect_score(files, "standard") == 3.0
    perfect = [_flags(40), _flags(50, 120, n=200)]
    raw = sum(nab.score_flags(f, x, "standard").score for f, x in zip(files, perfect))
    assert nab.normalized_score(raw, files, "standard") == pytest.approx(100.0)
    assert nab.normalized_score(-3.0, files, "standard") == 0.0


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"windows\[1\]: starts at row 45, inside or before the previous window"):
        nab.ScoringFile("bad", 100, ((40, 49), (45, 60)))
    with pytest.raises(ValueError, match=r"windows\[0\]: \(90, 120\) must satisfy 0 <= start <= end < n=100"):
        nab.ScoringFile("bad", 100, ((90, 120),))
    with pytest.raises(ValueError, match=r"scores: expected shape \(100,\) for toy, got \(99,\)"):
        nab.sweep([FILE], [np.zeros(99)], "standard")
    with pytest.raises(ValueError, match="NAB profile 'strict' is unknown"):
        nab.get_profile("strict")
    with pytest.raises(ValueError, match="Profile.fp: must be a finite weight >= 0"):
        nab.Profile(fp=-1)


@st.composite
def corpus(draw):
    files, scores = [], []
    for f in range(draw(st.integers(1, 3))):
        n = draw(st.integers(30, 120))
        cuts = sorted(draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=6, unique=True)))
        windows = tuple((cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2))
        files.append(nab.ScoringFile(f"f{f}", n, windows))
        # few distinct values, so ties are common
        scores.append(np.array(draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0]), min_size=n, max_size=n))))
    return files, scores


@settings(max_examples=60, deadline=None)
@given(corpus(), st.sampled_from(sorted(nab.PROFILES)))
def test_sweep_equals_scoring_every_threshold(data, profile):
    files, scores = data
    sw = nab.sweep(files, scores, profile)
    assert sw.scores[0] == pytest.approx(nab.null_score(files, profile))
    for t, total in zip(sw.thresholds[1:], sw.scores[1:]):
        direct = sum(nab.score_file(f, s, t, profile).score for f, s in zip(files, scores))
        assert total == pytest.approx(direct, abs=1e-9)
    _, best = nab.optimize_threshold(files, scores, profile)
    assert best >= max(sum(nab.score_file(f, s, t, profile).score for f, s in zip(files, scores))
                       for t in (0.0, 0.5, 1.0)) - 1e-9
    # the general (detect=...) search reaches the same optimum when given every distinct score
    grid = np.unique(np.concatenate(scores))
    _, best_grid = nab.optimize_threshold(files, scores, profile, detect=lambda s, t: s >= t, candidates=grid)
    assert best_grid == pytest.approx(best, abs=1e-9) or best == pytest.approx(nab.null_score(files, profile))


# ----------------------------------------------------------------- NAB's published per-file results

PUBLISHED = "detector_scores_realAdExchange.csv"


def _published() -> pd.DataFrame:
    path = needs_data("nab_realAdExchange", PUBLISHED)
    return pd.read_csv(path, keep_default_na=False)


def _ad_exchange_files() -> list[nab.ScoringFile]:
    return [nab.ScoringFile(s.name, len(s.frame), tuple(s.window_index()))
            for s in nab_data.load_corpus(["realAdExchange"], DATA_DIR)]


def test_published_counts_bound_the_published_scores():
    """Where the counts pin the score down (no row flagged in any window), it must match exactly or lie
    within the FP bounds; this is what the counts alone can check without the detectors' raw outputs."""
    pub = _published()
    files = {f.name: f for f in _ad_exchange_files()}
    checked = 0
    for row in pub.itertuples():
        f, p = files[row.File], nab.get_profile(row.Profile)
        if row.TP == 0:
            miss = -p.fn * len(f.windows)
            assert miss - p.fp * row.FP - 1e-9 <= row.Score <= miss + 1e-9, row
            if row.FP == 0:
                assert row.Score == pytest.approx(miss, abs=1e-9)
            checked += 1
        # the null detector flags nothing
        if row.Detector == "null":
            assert row.Score == pytest.approx(nab.null_score([f], p), abs=1e-9)
    assert checked >= 20


RESULTS = DATA_DIR / "nab_realAdExchange" / "results"


@pytest.mark.parametrize("detector", ["numenta", "randomCutForest", "ARTime", "windowedGaussian"])
def test_reproduces_published_per_file_scores_from_raw_outputs(detector):
    """Needs NAB's raw detector outputs (results/<detector>/realAdExchange/*.csv and
    config/thresholds.json at commit ea702d75), copied to ../shared/data/nab_realAdExchange/results/."""
    if not (RESULTS / detector).is_dir() or not (RESULTS / "thresholds.json").is_file():
        pytest.skip(f"NAB raw outputs not present under {RESULTS}")
    thresholds = json.loads((RESULTS / "thresholds.json").read_text())
    pub = _published()
    for f in _ad_exchange_files():
        out = pd.read_csv(RESULTS / detector / "realAdExchange" / f"{detector}_{f.name.split('/')[1]}")
        for profile in nab.PROFILES:
            got = nab.score_file(f, out["anomaly_score"].to_numpy(), thresholds[detector][profile]["threshold"], profile)
            row = pub[(pub.Detector == detector) & (pub.Profile == profile) & (pub.File == f.name)].iloc[0]
            assert got.score == pytest.approx(row.Score, abs=1e-6), (f.name, profile)
            assert (got.tp, got.tn, got.fp, got.fn) == (row.TP, row.TN, row.FP, row.FN)


# ----------------------------------------------------------------- loader

def test_loader_reads_series_windows_and_labels():
    needs_data("nab_realAdExchange", "exchange-2_cpc_results.csv")
    s = nab_data.load_series("realAdExchange/exchange-2_cpc_results.csv", DATA_DIR)
    assert len(s.frame) == 1624 and list(s.frame.columns) == ["timestamp", "value", "in_window"]
    assert s.window_index() == [(244, 406)] and int(s.frame["in_window"].sum()) == 163
    assert s.labels == (pd.Timestamp("2011-07-14 13:00:01"),)
    assert s.frame["timestamp"].dtype.kind == "M" and s.category == "realAdExchange"


def test_loader_keeps_file_order_when_a_clock_steps_back():
    needs_data("nab_realKnownCause_realTraffic", "realKnownCause", "machine_temperature_system_failure.csv")
    s = nab_data.load_series("realKnownCause/machine_temperature_system_failure.csv", DATA_DIR)
    assert not s.frame["timestamp"].is_monotonic_increasing  # row 10149 steps back 55 minutes in the file
    assert len(s.window_index()) == 4 and all(lo < hi for lo, hi in s.window_index())


def test_loader_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("WITHIN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="nab: 'realAdExchange/x.csv' is not a realAdExchange file"):
        nab_data.load_series("realAdExchange/x.csv", tmp_path)
    with pytest.raises(ValueError, match=r"nab: category 'foo' is not one of \['realAdExchange'"):
        nab_data.files("foo")
    with pytest.raises(FileNotFoundError, match="exchange-2_cpc_results.csv but it does not exist; set download=true"):
        nab_data.load_series("realAdExchange/exchange-2_cpc_results.csv", tmp_path)


def test_loader_downloads_with_checksum(tmp_path, monkeypatch):
    """download=True fetches into the cache layout and checks SHA-256 (a file:// mirror stands in for GitHub)."""
    src = needs_data("nab_realAdExchange")
    mirror = tmp_path / "mirror"
    (mirror / "data" / "realAdExchange").mkdir(parents=True)
    (mirror / "labels").mkdir()
    (mirror / "config").mkdir()
    name = "exchange-3_cpm_results.csv"
    (mirror / "data" / "realAdExchange" / name).write_bytes((src / name).read_bytes())
    for label in ("combined_windows.json", "combined_labels.json"):
        (mirror / "labels" / label).write_bytes((src / "labels" / label).read_bytes())
    (mirror / "config" / "profiles.json").write_bytes((src / "labels" / "profiles.json").read_bytes())
    monkeypatch.setattr(nab_data, "_RAW", mirror.as_uri())
    monkeypatch.setenv("WITHIN_CACHE_DIR", str(tmp_path / "cache"))
    s = nab_data.load_series(f"realAdExchange/{name}", tmp_path / "empty", download=True)
    assert len(s.frame) == 1538 and (tmp_path / "cache" / "nab" / "nab_realAdExchange" / name).is_file()
    (mirror / "data" / "realAdExchange" / name).write_bytes(b"timestamp,value\n")
    (tmp_path / "cache" / "nab" / "nab_realAdExchange" / name).unlink()
    with pytest.raises(OSError, match="checksum mismatch"):
        nab_data.load_series(f"realAdExchange/{name}", tmp_path / "empty", download=True)
