"""PerformanceMonitor.detect_drift on simulator streams with a drift injected at a known row ->
benchmarks/results/drift_detection.json (+ .md).

Each seed is its own world (AdMarketSimulator(seed)) and stream of `windows` windows of W rows; the
drift starts inside window D (at 0.855-0.905 of the stream). Scenarios:

* concept / concept_weak: the shifts of the simulator's `drift=` knob (per-account N(0, account_sd^2)
  and per-state N(0, region_sd^2) logit shifts, the world's own draws) applied to the clicks of
  every row from the onset; features do not change, the model's calibration does.
* covariate: from the onset 40% of mobile impressions are dropped (device mix 60/30/10 ->
  about 47/37/12); the click model is unchanged.

The stream is a shuffled sample of the world (the simulator's daily cycle would otherwise read as
drift between windows of a few hours; a production monitor should compare like with like, e.g. a
reference of the same hours), so the onset row is exact: T = 0.855 n plus up to n/20 at random.
The model scored is the truth without drift, logit(true_ctr), plus a fixed N(0, 0.2^2) logit
error per ad (a good but imperfect model that knows nothing of the drift). The monitor logs tabular
features (bid, budget, population_density, hour, placement, device, age_band, gender, country)
and segments (account_id, state); `detect_drift()` runs after every window past the reference.

Reported per scenario over seeds: detection within one window (the first check that fires at or
after window D is D or D + 1), its delay in windows, false alarms per pre-drift check (windows
past the reference and before D) and the share of seeds with any false alarm, and which tests fired.

Each stream is watched by one monitor per `--references` value (the number of windows at the start
that form the reference, `PerformanceMonitor(reference_windows=...)`): a longer reference halves
the noise the comparison carries from the reference side.

Run: python -m benchmarks.drift_detection [--seeds 20] [--window 20000] [--windows 13] [--references 1,3]
     [--scenarios concept,concept_weak,covariate]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import track
from scipy.special import expit, logit

from benchmarks.common import RESULTS, machine, write_json
from within.data.simulator import AdMarketSimulator
from within.monitoring.monitor import PerformanceMonitor

NAME = "drift_detection"
FEATURES = ["bid", "budget", "population_density", "hour", "placement", "device", "age_band", "gender", "country"]
SEGMENTS = ["account_id", "state"]
SCENARIOS: dict[str, dict[str, Any]] = {
    "concept": {"drift": {"account_sd": 0.5, "region_sd": 0.3}},
    "concept_weak": {"drift": {"account_sd": 0.25, "region_sd": 0.15}},
    "covariate": {"keep_mobile": 0.6},
}
ONSET_FRAC = 0.855
MODEL_ERROR_SD = 0.2
ALERT_THRESHOLD = 0.01


def build_stream(seed: int, scenario: str, n: int) -> tuple[pd.DataFrame, np.ndarray, int]:
    """(rows in stream order with features and labels, the model's predictions, onset row T)."""
    spec = SCENARIOS[scenario]
    # start_frac=1: the world draws its drift shifts but applies none; the stream applies them by row
    sim = AdMarketSimulator(seed=seed, drift={**spec.get("drift", {}), "start_frac": 1.0})
    keep = spec.get("keep_mobile", 1.0)
    pool = sim.sample(int(n / (ONSET_FRAC + (1 - ONSET_FRAC) * (0.6 * keep + 0.4)) * 1.03) + 1000)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99,)))
    pool = pool.iloc[rng.permutation(len(pool))].reset_index(drop=True)  # stationary: no daily cycle
    t = int(ONSET_FRAC * n + rng.integers(0, n // 20))
    after = np.arange(len(pool)) >= t
    if keep < 1.0:
        drop = after & (pool["device"] == "mobile").to_numpy() & (rng.random(len(pool)) >= keep)
        pool, after = pool.loc[~drop].reset_index(drop=True), after[~drop]
    if len(pool) < n:
        raise RuntimeError(f"{scenario}: pool of {len(pool)} rows is short of {n}")
    df, after = pool.iloc[:n].copy(), after[:n]
    acc = pd.Index(sim.account_ids).get_indexer(df["account_id"].astype(object))
    state = pd.Index(sim.state_names).get_indexer(df["state"].astype(object))
    base = logit(np.clip(df["true_ctr"].to_numpy(), 1e-12, 1 - 1e-12))
    if "drift" in spec:  # the same shifts the simulator's drift knob applies, from row t on
        shift = np.where(after, sim.drift_account[acc] + sim.drift_state[state], 0.0)
        df["clicked"] = (rng.random(n) < expit(base + shift)).astype(np.int64)
    ad = pd.Index(sim.ad_ids).get_indexer(df["ad_id"].astype(object))
    ad_error = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(98,))).normal(0, MODEL_ERROR_SD, len(sim.ad_ids))
    return df, expit(base + ad_error[ad]), t


def run_seed(seed: int, scenario: str, window: int, windows: int, references: list[int]) -> dict[int, dict[str, Any]]:
    """One stream, one monitor per reference length (windows at the start that form the reference)."""
    t0 = time.perf_counter()
    df, p, onset = build_stream(seed, scenario, window * windows)
    monitors = {r: PerformanceMonitor(window_size=window, alert_threshold=ALERT_THRESHOLD, reference_windows=r)
                for r in references}
    checks: dict[int, list[dict[str, Any]]] = {r: [] for r in references}
    for k in range(windows):
        rows = slice(k * window, (k + 1) * window)
        part = df.iloc[rows]
        for r, monitor in monitors.items():
            monitor.log_prediction(p[rows], part["clicked"].to_numpy(), features=part[FEATURES],
                                   segment=part[SEGMENTS].astype(str))
            if k >= r:
                rep = monitor.detect_drift(emit=False)
                checks[r].append({"window": k, "drifted": rep.drifted, "tests": len(rep.results),
                                  "fired": [f"{x.test}:{x.subject}" for x in rep.fired]})
    d = onset // window
    seconds = time.perf_counter() - t0
    out = {}
    for r, cs in checks.items():
        pre = [c for c in cs if c["window"] < d]
        post = [c for c in cs if c["window"] >= d and c["drifted"]]
        first = post[0]["window"] if post else None
        out[r] = {
            "seed": seed, "onset_row": onset, "onset_window": d, "tests_per_check": cs[0]["tests"],
            "false_alarms": sum(c["drifted"] for c in pre), "pre_drift_checks": len(pre),
            "false_alarm_tests": sorted({f for c in pre for f in c["fired"]}),
            "detected_window": first, "delay_windows": None if first is None else first - d,
            "detected_within_one": first is not None and first - d <= 1,
            "fired_at_detection": post[0]["fired"] if post else [],
            "seconds_all_monitors": seconds,
        }
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    det = np.array([r["detected_within_one"] for r in runs], dtype=float)
    fa = np.array([r["false_alarms"] / max(r["pre_drift_checks"], 1) for r in runs])
    delays = [r["delay_windows"] for r in runs if r["delay_windows"] is not None]
    fired: dict[str, int] = {}
    for r in runs:
        for f in set(r["fired_at_detection"]):
            fired[f] = fired.get(f, 0) + 1
    checks = sum(r["pre_drift_checks"] for r in runs)
    alarms = sum(r["false_alarms"] for r in runs)
    return {
        "seeds": len(runs),
        "detection_within_one_window": {"mean": float(det.mean()), "sd": float(det.std(ddof=1))},
        "delay_windows": {"mean": float(np.mean(delays)) if delays else None,
                          "sd": float(np.std(delays, ddof=1)) if len(delays) > 1 else None},
        "false_alarm_rate_per_check": {"mean": float(fa.mean()), "sd": float(fa.std(ddof=1)),
                                       "pooled": alarms / max(checks, 1), "checks": checks, "alarms": alarms},
        "seeds_with_any_false_alarm": float(np.mean([r["false_alarms"] > 0 for r in runs])),
        "tests_firing_at_detection": dict(sorted(fired.items(), key=lambda kv: -kv[1])),
        "accept_detection_ge_0.9": float(det.mean()) >= 0.9,
        "accept_false_alarm_le_0.05": alarms / max(checks, 1) <= 0.05,
        "seconds_per_seed_all_monitors": float(np.mean([r["seconds_all_monitors"] for r in runs])),
    }


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = ["# Drift detection", "",
             (f"{cfg['seeds']} seeds (worlds), windows of {cfg['window']} rows, {cfg['windows']} windows per stream, "
              f"onset at 0.855-0.905 of the stream; family-wise level {cfg['alert_threshold']} per check. "
              "Detection: the first check firing at or after the onset window is it or the next one. "
              "Mean ± sd over seeds; the pooled false-alarm count in brackets."), "",
             ("| scenario | reference windows | detected within one window | delay (windows) | "
              "false alarms per pre-drift check | seeds with any false alarm | tests firing at detection |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, by_ref in result["scenarios"].items():
        for ref, s in by_ref.items():
            q = s["summary"]
            d, fa, dl = q["detection_within_one_window"], q["false_alarm_rate_per_check"], q["delay_windows"]
            delay = "-" if dl["mean"] is None else f"{dl['mean']:.2f} ± {dl['sd'] or 0:.2f}"
            tests = ", ".join(f"{k} ({v})" for k, v in list(q["tests_firing_at_detection"].items())[:4])
            lines.append(f"| {name} | {ref} | {d['mean']:.2f} ± {d['sd']:.2f} | {delay} | {fa['mean']:.3f} ± "
                         f"{fa['sd']:.3f} ({fa['alarms']}/{fa['checks']}) | {q['seeds_with_any_false_alarm']:.2f} | "
                         f"{tests} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--window", type=int, default=20_000)
    ap.add_argument("--windows", type=int, default=13)
    ap.add_argument("--references", default="1,3", help="reference lengths in windows, compared on the same streams")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        "machine": machine(), "note": "shared 2-core machine; seconds are indicative only",
        "config": {"seeds": args.seeds, "window": args.window, "windows": args.windows, "onset_frac": ONSET_FRAC,
                   "reference_windows": args.references,
                   "alert_threshold": ALERT_THRESHOLD, "model_error_sd": MODEL_ERROR_SD, "features": FEATURES,
                   "segments": SEGMENTS, "scenarios": {k: SCENARIOS[k] for k in args.scenarios.split(",")}},
        "scenarios": {},
    }
    for name in args.scenarios.split(","):
        refs = [int(r) for r in args.references.split(",")]
        runs = [run_seed(seed, name, args.window, args.windows, refs)
                for seed in track(range(args.seeds), description=f"{name}: seeds")]
        result["scenarios"][name] = {str(r): {"summary": summarize([x[r] for x in runs]), "runs": [x[r] for x in runs]}
                                     for r in refs}
        write_json(NAME, result)  # after each scenario, so a crash keeps what is done
    (RESULTS / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
