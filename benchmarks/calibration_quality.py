"""Calibration quality benchmark -> benchmarks/results/calibration_quality.json.

1. Simulator (true CTR known, default world size): ece_true of the model before / after
   calibrator=spline and the AUC change (acceptance: ece_true <= 0.003, |AUC change| <= 1e-4);
   coverage of the true CTR by the alpha=0.1 intervals (target [0.88, 0.95]) and mean width, with
   the interval model's tau^2 against the one measured with true_ctr; int8 AUC change and speedup
   at batch 1024 (paired timing, its noise floor, and where the time goes).
2. Interval coverage on other world seeds and sizes (`--interval-runs`).
3. Simulator world with drift (per-account and per-state logit shifts from where calib begins, so
   calib and test drift away from train and val): Field-RCE by account / state / city of global
   temperature scaling vs hierarchical vs geospatial (acceptance: hierarchical on account and
   geospatial on region <= 50% of global), calib split >= 200k rows.
4. Spline vs isotonic held-out ECE on iPinYou and KAG conversions (skipped when ../shared/data lacks
   them), at 15 bins and at a bin count with >= 10 test clicks per bin, with a paired bootstrap.

Every model is trained through run_train (benchmarks.common.train); calibrators are fitted on the
calib split and scored on test. The JSON is written after each section; sections not run keep their
stored results.

    python -m benchmarks.calibration_quality                            # every section (hours on a CPU)
    python -m benchmarks.calibration_quality --sections real            # iPinYou / KAG only
    python -m benchmarks.calibration_quality --rows 6000 --drift-rows 6000 --interval-runs 6000:11 \
        --epochs 1 --results-dir /tmp/cq                                # a trial run
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.common import DATA_DIR, ROOT, parser, read_json, train, write_json
from within.calibration import make_calibrator
from within.calibration.intervals import coverage
from within.calibration.metrics import REPORT_MIN_CLICKS, auc, ece, ece_true, field_rce, logloss

NAME = "calibration_quality"


def configured_calibrator(name: str):
    """A fresh calibrator as `calibrator=<name>` configures it (conf/calibrator/<name>.yaml)."""
    return instantiate(OmegaConf.load(ROOT / "conf" / "calibrator" / f"{name}.yaml"), _convert_="all")


def simulator_spline(tmp: Path, rows: int, epochs: int) -> dict:
    run = train([
        f"data.source.n={rows}", f"trainer.max_epochs={epochs}", "calibrator=spline",
        "postfit=[calibrate,intervals,quantize,export]", "quantize.repeats=21",
    ], tmp / "spline")
    predictor, m, test = run.model, run.metrics, run.frames()["test"]
    raw = 1 / (1 + np.exp(-predictor.predict_logits(test)))
    p = predictor.predict(test)
    y, truth = test["clicked"].to_numpy(float), test["true_ctr"].to_numpy(float)
    out = {
        "rows": rows, "epochs": epochs,
        "ece_true_before": ece_true(raw, truth), "ece_true_after_spline": ece_true(p, truth),
        "auc_before": auc(raw, y), "auc_after_spline": auc(p, y), "oracle_auc": m.get("test/oracle_auc"),
        "interval_coverage_true_alpha0.1": m.get("test/interval_coverage_true"),
        "interval_mean_width": m.get("test/interval_width"),
        "quantize_auc_delta": m.get("quantize/auc_delta"), "quantize_logloss_delta": m.get("quantize/logloss_delta"),
        "quantize_speedup_b1024": m.get("quantize/speedup_b1024"), "onnx_max_abs_diff": m.get("export/onnx_max_abs_diff"),
    }
    out.update(interval_diagnostics(predictor, test))
    qinfo = run.out_dir / "export" / "quantize.json"
    if qinfo.is_file():
        q = json.loads(qinfo.read_text())
        out["quantize_timing"] = {k: q.get(k) for k in ("backend", "fp32_ms", "int8_ms", "timing", "time_breakdown_ms")}
    out["auc_change"] = out["auc_after_spline"] - out["auc_before"]
    out["accept_ece_true_le_0.003"] = out["ece_true_after_spline"] <= 0.003
    out["accept_auc_unchanged_1e-4"] = abs(out["auc_change"]) <= 1e-4
    cov = out["interval_coverage_true_alpha0.1"]
    out["accept_coverage_in_[0.88,0.95]"] = cov is not None and 0.88 <= cov <= 0.95
    out["accept_quantize_auc_loss_le_0.002"] = out["quantize_auc_delta"] is not None and out["quantize_auc_delta"] >= -0.002
    out["accept_quantize_faster_b1024"] = (out["quantize_speedup_b1024"] or 0) > 1.0
    return out


def interval_diagnostics(predictor, test) -> dict:
    """What the interval model estimated against what the simulator knows: tau^2 (variance of the
    true logit around a + b s) vs the same variance measured with true_ctr on the test rows."""
    pi = predictor.intervals
    s = predictor.predict_logits(test)
    t = np.log(test["true_ctr"].to_numpy(float)) - np.log1p(-test["true_ctr"].to_numpy(float))
    a, b = pi.params_["a"], pi.params_["b"]
    slope, icpt = np.polyfit(s, t, 1)
    return {"interval_method": "Berkson logistic-normal, tau^2 from crossed unit-pair moments",
            "interval_tau2_estimated": pi.params_["tau2"],
            "interval_tau2_true_around_fit": float(np.var(t - (a + b * s))),
            "interval_true_logit_regression": {"a": float(icpt), "b": float(slope)},
            "interval_fit": {"a": a, "b": b},
            "interval_components": {k: v for k, v in pi.components_.items() if v > 0}}


def interval_validation(tmp: Path, runs: list[tuple[int, int]], epochs: int) -> list[dict]:
    """Coverage of true_ctr by the alpha = 0.1 intervals on other world seeds and sizes."""
    out = []
    for rows, seed in runs:
        run = train([
            f"data.source.n={rows}", f"seed={seed}", f"trainer.max_epochs={epochs}", "calibrator=spline",
            "postfit=[calibrate,intervals,export]", "export.onnx=false",
        ], tmp / f"iv_{rows}_{seed}")
        predictor, m, frames = run.model, run.metrics, run.frames()
        test = frames["test"]
        res = {"rows": rows, "seed": seed, "rows_calib": len(frames["calib"]),
               "coverage_true_alpha0.1": m.get("test/interval_coverage_true"),
               "mean_width": m.get("test/interval_width")}
        _, lo, hi = predictor.predict_with_intervals(test, alpha=0.05)
        res["coverage_true_alpha0.05"] = coverage(lo, hi, test["true_ctr"].to_numpy(float))
        res.update(interval_diagnostics(predictor, test))
        cov = res["coverage_true_alpha0.1"]
        res["accept_coverage_in_[0.88,0.95]"] = cov is not None and 0.88 <= cov <= 0.95
        out.append(res)
    return out


# The drift world: drift starts at DRIFT_START of the timeline, where val ends and calib begins, so
# train and val (early stopping) see no drift and calib and test carry the same drift. The split
# gives calib 30% of the rows (>= 200k rows at the default 700k).
DRIFT_START = 0.35
DRIFT_SPLIT = {"val_frac": 0.05, "calib_frac": 0.30, "test_frac": 0.35}  # train: the first 30%
DRIFT_SD = {"account_sd": 0.5, "region_sd": 0.5}


def drift_field_rce(tmp: Path, rows: int, epochs: int) -> dict:
    run = train([
        f"data.source.n={rows}", f"trainer.max_epochs={epochs}", "calibrator=none", "postfit=[export]",
        "export.onnx=false", *(f"data.source.drift.{k}={v}" for k, v in DRIFT_SD.items()),
        f"data.source.drift.start_frac={DRIFT_START}", *(f"data.split.{k}={v}" for k, v in DRIFT_SPLIT.items()),
    ], tmp / "drift")
    predictor, frames = run.model, run.frames()
    calib, test = frames["calib"], frames["test"]
    s_cal, s_test = predictor.predict_logits(calib), predictor.predict_logits(test)
    y_cal, y_test = calib["clicked"].to_numpy(float), test["clicked"].to_numpy(float)
    out: dict = {"rows": rows, "rows_calib": len(calib), "rows_test": len(test),
                 "drift": {**DRIFT_SD, "start_frac": DRIFT_START}, "split": DRIFT_SPLIT,
                 "field_rce": f"Pan et al. Eq. 4 with field values of < {REPORT_MIN_CLICKS} test clicks pooled "
                              "(as in the run report); *_paper: no pooling"}
    fields = {"account": test["account_id"].to_numpy(), "state": test["state"].to_numpy(),
              "city": test["city"].to_numpy()}
    for name in ("temperature", "hierarchical", "geospatial"):
        cal = configured_calibrator(name)
        # the columns this calibrator keys on; positional: GeospatialCalibrator names the argument `regions`
        cal.fit(s_cal, y_cal, predictor.group_columns(calib, calibrator=cal))
        p = cal.transform(s_test, predictor.group_columns(test, calibrator=cal))
        res = {"ece_true": ece_true(p, test["true_ctr"].to_numpy(float)), "auc": auc(p, y_test)}
        for field, keys in fields.items():
            res[f"field_rce_{field}"] = field_rce(p, y_test, keys, min_clicks=REPORT_MIN_CLICKS)
            res[f"field_rce_{field}_paper"] = field_rce(p, y_test, keys)
        out[name] = res
    for name in ("hierarchical", "geospatial"):
        for field in fields:
            for suffix in ("", "_paper"):
                key = f"field_rce_{field}{suffix}"
                out[name][f"{key}_vs_global"] = out[name][key] / out["temperature"][key]
    # the acceptance pairs each calibrator with the field it models: hierarchical keys on the
    # account hierarchy, geospatial on the region chain (the cross numbers are reported above)
    out["accept_hierarchical_account_le_50pct"] = out["hierarchical"]["field_rce_account_vs_global"] <= 0.5
    out["accept_geospatial_state_le_50pct"] = out["geospatial"]["field_rce_state_vs_global"] <= 0.5
    return out


def ece_bins(clicks: float, min_clicks_per_bin: int = 10, max_bins: int = 15) -> int:
    """Equal-mass bins with >= `min_clicks_per_bin` clicks on average: with fewer, a bin's observed
    rate is mostly Bernoulli noise and the ECE ranks calibrators by that noise."""
    return int(max(2, min(max_bins, clicks // min_clicks_per_bin)))


def paired_bootstrap_ece(p_a, p_b, y, w, n_bins: int, reps: int = 500, seed: int = 0) -> dict:
    """Test rows resampled with replacement; ECE(a) - ECE(b) on each resample (95% interval)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = []
    for _ in range(reps):
        i = rng.integers(0, n, n)
        wi = None if w is None else w[i]
        diffs.append(ece(p_a[i], y[i], n_bins=n_bins, weight=wi) - ece(p_b[i], y[i], n_bins=n_bins, weight=wi))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"mean": float(np.mean(diffs)), "ci95": [float(lo), float(hi)]}


def real_spline_vs_isotonic(tmp: Path, data: str, epochs: int) -> dict:
    run = train([f"data={data}", f"features={data}", f"trainer.max_epochs={epochs}", "calibrator=none",
                 "postfit=[export]", "export.onnx=false"], tmp / data)
    predictor, frames = run.model, run.frames()
    spec = predictor.spec
    # these data configs may set no calib split: then calibrate on val (early stopping used it too)
    calib = frames["calib"] if len(frames.get("calib", ())) else frames["val"]
    test = frames["test"]
    w_cal = calib[spec.weight].to_numpy(float) if spec.weight else None
    w_test = test[spec.weight].to_numpy(float) if spec.weight else None
    s_cal, s_test = predictor.predict_logits(calib), predictor.predict_logits(test)
    y_cal, y_test = calib[spec.label].to_numpy(float), test[spec.label].to_numpy(float)
    bins = ece_bins(y_test.sum())
    rate = lambda y, w: float(y.sum() / (len(y) if w is None else w.sum()))
    out = {"rows_calib": len(calib), "rows_test": len(test), "calibrated_on": "calib" if calib is frames.get("calib") else "val",
           "clicks_calib": float(y_cal.sum()), "clicks_test": float(y_test.sum()),
           "rate_calib": rate(y_cal, w_cal), "rate_test": rate(y_test, w_test),
           "ece_uncalibrated": ece(1 / (1 + np.exp(-s_test)), y_test, weight=w_test),
           "ece_bins_rule": f">= 10 test clicks per equal-mass bin, 2..15 bins: {bins} bins"}
    probs = {}
    for name in ("spline", "isotonic"):
        # spline as configured for calibrator=spline (conf/calibrator/spline.yaml)
        cal = configured_calibrator("spline") if name == "spline" else make_calibrator(name)
        cal.fit(s_cal, y_cal, weight=w_cal)
        probs[name] = p = cal.transform(s_test)
        out[f"ece_{name}"] = ece(p, y_test, weight=w_test)  # 15 bins, as before
        out[f"ece{bins}_{name}"] = ece(p, y_test, n_bins=bins, weight=w_test)
        out[f"logloss_{name}"] = logloss(p, y_test, weight=w_test)
        if name == "spline":
            out["spline_regularization_used"] = cal.regularization_
    out[f"ece{bins}_spline_minus_isotonic_bootstrap"] = paired_bootstrap_ece(
        probs["spline"], probs["isotonic"], y_test, w_test, bins)
    out["accept_spline_le_isotonic_single_split"] = out[f"ece{bins}_spline"] <= out[f"ece{bins}_isotonic"]
    # one split of a few hundred rows ranks the calibrators by its noise: also re-split the held-out
    # rows (calib + test, which the model never trained on) at random, many times
    s_all, y_all = np.concatenate([s_cal, s_test]), np.concatenate([y_cal, y_test])
    w_all = None if w_cal is None else np.concatenate([w_cal, w_test])
    out["resplit"] = resplit_ece(s_all, y_all, w_all)
    out["accept_spline_le_isotonic"] = out["resplit"]["ece_spline_mean"] <= out["resplit"]["ece_isotonic_mean"]
    return out


def resplit_ece(s, y, w, reps: int = 100, seed: int = 0) -> dict:
    """Held-out ECE of spline vs isotonic over `reps` random 50/50 splits (fit on one half, ECE on
    the other, bins by the half's clicks as in the single split).

    Two references: `constant` (the fit half's click rate for every row) and `spline_tied` (the
    spline's output rounded to 1e-6, which makes ties the way isotonic's blocks are). Equal-mass bins
    split tied predictions by row order, but strictly ordered ones by the score; where the score
    carries no signal the two binnings differ by noise alone."""
    rng = np.random.default_rng(seed)
    n = len(s)
    eces: dict[str, list[float]] = {"spline": [], "isotonic": []}
    refs: dict[str, list[float]] = {"constant": [], "spline_tied": []}
    for _ in range(reps):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2:]
        wa, wb = (None, None) if w is None else (w[a], w[b])
        bins = ece_bins(y[b].sum())
        for name, values in eces.items():
            cal = configured_calibrator("spline") if name == "spline" else make_calibrator(name)
            cal.fit(s[a], y[a], weight=wa)
            p = cal.transform(s[b])
            values.append(ece(p, y[b], n_bins=bins, weight=wb))
            if name == "spline":
                refs["spline_tied"].append(ece(np.round(p, 6), y[b], n_bins=bins, weight=wb))
        rate = y[a].sum() / (len(a) if wa is None else wa.sum())
        refs["constant"].append(ece(np.full(len(b), rate), y[b], n_bins=bins, weight=wb))
    sp, iso = np.array(eces["spline"]), np.array(eces["isotonic"])
    d = sp - iso
    return {"reps": reps, "rows": n, "ece_spline_mean": float(sp.mean()), "ece_isotonic_mean": float(iso.mean()),
            "diff_mean": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(reps)),
            "spline_le_isotonic_share": float((d <= 0).mean()),
            "ece_constant_mean": float(np.mean(refs["constant"])),
            "ece_spline_tied_mean": float(np.mean(refs["spline_tied"]))}


SECTIONS = ("simulator", "intervals", "drift", "real")
REAL_DATA = {"ipinyou": "ipinyou_deepctr_sample", "kag_conversion": "facebook_ad_conversions_KAG"}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=800_000, help="simulator rows (the default world size)")
    ap.add_argument("--drift-rows", type=int, default=700_000, help="drift world rows (calib split: 30%%)")
    ap.add_argument("--interval-runs", default="400000:11",
                    help="extra (rows:seed,...) simulator runs that check interval coverage")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma list of {SECTIONS}; sections not run keep their stored results")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        raise SystemExit(f"--sections: unknown {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    results: dict = (read_json(NAME, args.results_dir) or {}) if sections != set(SECTIONS) else {}
    if not isinstance(results.get("seconds"), dict):
        results["seconds"] = {}
    runs = [tuple(int(x) for x in r.split(":")) for r in args.interval_runs.split(",") if r]
    with TemporaryDirectory() as d:
        tmp = Path(d)
        simulator_sections = {  # section -> (results key, what it runs)
            "simulator": ("simulator_spline", lambda: simulator_spline(tmp, args.rows, args.epochs)),
            "intervals": ("interval_validation", lambda: interval_validation(tmp, runs, args.epochs)),
            "drift": ("drift_field_rce", lambda: drift_field_rce(tmp, args.drift_rows, args.epochs)),
        }
        for section, (key, run) in simulator_sections.items():
            if section in sections:
                start = time.time()
                results[key] = run()
                results["seconds"][section] = time.time() - start
                write_json(NAME, results, args.results_dir)  # a later section failing keeps this one
        if "real" in sections:
            start = time.time()
            for data, folder in REAL_DATA.items():
                if not (DATA_DIR / folder).exists():
                    results[data] = {"skipped": f"{DATA_DIR / folder} not present"}
                    continue
                try:
                    results[data] = real_spline_vs_isotonic(tmp, data, args.epochs)
                except Exception as err:  # noqa: BLE001 - a loader or data problem is reported, the benchmark goes on
                    results[data] = {"error": f"{type(err).__name__}: {err}"}
            results["seconds"]["real"] = time.time() - start
    print(f"wrote {write_json(NAME, results, args.results_dir)}")
    print({k: v for k, v in results.items() if k != "seconds"})


if __name__ == "__main__":
    main()
