"""AccountHealthPredictor on Telco churn and on simulator accounts -> benchmarks/results/account_health.json (+ .md,
reliability plot account_health_reliability.png).

telco: for each model type, 5 seeds of a stratified 80/20 split (the predictor itself holds out 25% of
  the 80% to calibrate on): held-out AUC, ECE (15 equal-mass bins, within.calibration.metrics.ece),
  logloss, Brier, calib_ratio. ECE noise is measured first: for each split's own predictions p,
  labels drawn from p (500 draws) give the ECE a perfectly calibrated model would score on that
  many rows (`ece_floor`: mean and 95th percentile), and `ece_test_p` is the share of those draws
  at or above the observed ECE (a calibration test). Then 5-fold stratified cross-validation
  pools one out-of-fold prediction per customer (7043 rows), where the floor is lower.
simulator: worlds of 600 accounts x 24 months (AccountChurnSimulator, known churn formula), fitted on
  75% of the accounts, scored on the rest: AUC against the oracle's (the true churn probability),
  ece_true, and how well SHAP recovers the true factors: true factors in the top 5 by mean |SHAP|,
  Spearman rank correlation of mean |SHAP| with mean |true term| over all 10 indicators (0 for the
  5 non-causal ones), correlation of each factor's SHAP value with its true term, and per account
  (latest month) agreement of the top factor and overlap of the top 3.

Run: python -m benchmarks.account_health [--seeds 5] [--worlds 5] [--sections telco,simulator]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import StratifiedKFold, train_test_split

from benchmarks.common import DATA_DIR, RESULTS, machine, write_json
from within.calibration.metrics import auc, brier, calibration_ratio, ece, ece_true, logloss
from within.data.accounts import CHURN_COEF, INDICATORS, AccountChurnSimulator
from within.data.loaders import telco
from within.data.simulator import AdMarketSimulator
from within.models.account_health import AccountHealthPredictor

NAME = "account_health"
MODEL_TYPES = ("gbm", "logistic")
ECE_DRAWS, N_BINS = 500, 15
WORLD = {"n_accounts": 600, "campaigns_per_account": 3, "ad_groups_per_campaign": 1, "ads_per_ad_group": 2}


def mean_sd(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def ece_floor(p: np.ndarray, observed: float, seed: int) -> dict[str, float]:
    """ECE of perfectly calibrated labels (drawn from p itself) on the same rows, and where `observed` falls."""
    rng = np.random.default_rng(seed)
    draws = np.array([ece(p, (rng.random(p.size) < p).astype(float), n_bins=N_BINS) for _ in range(ECE_DRAWS)])
    return {"ece_floor_mean": float(draws.mean()), "ece_floor_p95": float(np.quantile(draws, 0.95)),
            "ece_test_p": float(np.mean(draws >= observed)), "ece_excess": float(observed - draws.mean())}


def scores(p: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    e = ece(p, y, n_bins=N_BINS)
    return {"auc": auc(p, y), "ece": e, "logloss": logloss(p, y), "brier": brier(p, y),
            "calib_ratio": calibration_ratio(p, y), "rows": int(y.size), **ece_floor(p, e, seed)}


def telco_model(df: pd.DataFrame, model_type: str, seed: int) -> AccountHealthPredictor:
    indicators = [c for c in df.columns if c not in (telco.ID, telco.LABEL)]
    actionable = ["Contract", "PaymentMethod", "PaperlessBilling", "OnlineSecurity", "TechSupport"]
    return AccountHealthPredictor(indicators, model_type=model_type, id_column=telco.ID, actionable=actionable,
                                  healthy_values={"OnlineSecurity": "Yes", "TechSupport": "Yes"}, random_state=seed)


def section_telco(seeds: int) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    df = telco.load(DATA_DIR / "telco_customer_churn")
    y_all = df[telco.LABEL].to_numpy()
    out: dict[str, Any] = {"rows": len(df), "churn_rate": float(y_all.mean()), "n_bins": N_BINS, "models": {}}
    pooled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for model_type in MODEL_TYPES:
        runs = []
        for seed in range(seeds):
            train, test = train_test_split(df, test_size=0.2, stratify=df[telco.LABEL], random_state=seed)
            t0 = time.perf_counter()
            model = telco_model(df, model_type, seed).fit(train, telco.LABEL)
            fit_s = time.perf_counter() - t0
            p = model.predict_churn_risk(test)
            runs.append({"seed": seed, "fit_seconds": fit_s, **scores(p, test[telco.LABEL].to_numpy(), seed)})
        summary = {k: mean_sd([r[k] for r in runs]) for k in runs[0] if k not in ("seed", "rows")}
        oof = np.empty(len(df))
        for fold, (tr, te) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(df, y_all)):
            oof[te] = telco_model(df, model_type, fold).fit(df.iloc[tr], telco.LABEL).predict_churn_risk(df.iloc[te])
        pooled[model_type] = (oof, y_all)
        example = model.recommend_actions(test[telco.ID].iloc[int(np.argmax(p))])
        out["models"][model_type] = {
            "splits": runs, "summary": summary,
            "pooled_out_of_fold": scores(oof, y_all, 99),
            "accept_auc_ge_0.84": summary["auc"]["mean"] >= 0.84,
            "accept_ece_le_0.02": summary["ece"]["mean"] <= 0.02,
            "accept_pooled_ece_le_0.02": scores(oof, y_all, 99)["ece"] <= 0.02,
            "example_actions_riskiest_customer": example,
        }
    return out, pooled


def section_simulator(worlds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"world": WORLD, "months": 24, "true_factors": CHURN_COEF, "models": {}}
    true_set = set(CHURN_COEF)
    for model_type in MODEL_TYPES:
        runs = []
        for w in range(worlds):
            cs = AccountChurnSimulator(AdMarketSimulator(seed=100 + w, **WORLD), months=24)
            panel = cs.panel()
            ids = np.array(sorted(panel["account_id"].unique()))
            rng = np.random.default_rng(w)
            test_ids = set(rng.choice(ids, size=len(ids) // 4, replace=False))
            is_test = panel["account_id"].isin(test_ids).to_numpy()
            train, test = panel[~is_test], panel[is_test]
            model = AccountHealthPredictor(list(INDICATORS), model_type=model_type, period_column="month",
                                           random_state=w).fit(train, "churned")
            p = model.predict_churn_risk(test)
            shap = model.shap_values(test)
            truth = cs.true_contributions(test, reference=train)
            mean_abs = shap.abs().mean()
            true_abs = pd.Series({c: float(truth[c].abs().mean()) if c in truth else 0.0 for c in INDICATORS})
            top5 = set(mean_abs.sort_values(ascending=False).index[:5])
            latest = test.groupby("account_id").tail(1).index
            s_acc = shap.loc[latest, list(INDICATORS)].abs().to_numpy()
            t_acc = truth.reindex(columns=list(INDICATORS), fill_value=0.0).loc[latest].abs().to_numpy()
            top1 = float(np.mean(s_acc.argmax(1) == t_acc.argmax(1)))
            top3 = float(np.mean([len(set(np.argsort(-a)[:3]) & set(np.argsort(-b)[:3])) / 3
                                  for a, b in zip(s_acc, t_acc)]))
            runs.append({
                "world_seed": 100 + w, "rows_train": len(train), "rows_test": len(test),
                "churn_events_test": int(test["churned"].sum()),
                "auc": auc(p, test["churned"]), "oracle_auc": auc(test["churn_probability"], test["churned"]),
                "ece_true": ece_true(p, test["churn_probability"].to_numpy(), n_bins=10),
                "true_factors_in_top5": len(top5 & true_set) / 5,
                "spearman_mean_abs_shap_vs_truth": float(stats.spearmanr(mean_abs[list(INDICATORS)], true_abs).statistic),
                "factor_corr": {c: float(np.corrcoef(shap[c], truth[c])[0, 1]) for c in CHURN_COEF},
                "per_account_top1_agreement": top1, "per_account_top3_overlap": top3,
            })
        summary = {k: mean_sd([r[k] for r in runs]) for k in runs[0]
                   if k not in ("world_seed", "factor_corr") and not k.startswith("rows")}
        summary["factor_corr"] = {c: mean_sd([r["factor_corr"][c] for r in runs]) for c in CHURN_COEF}
        out["models"][model_type] = {"worlds": runs, "summary": summary}
    return out


def reliability_plot(pooled: dict[str, tuple[np.ndarray, np.ndarray]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    for model_type, (p, y) in pooled.items():
        order = np.argsort(p, kind="stable")
        bins = np.array_split(order, N_BINS)
        mp = np.array([p[b].mean() for b in bins])
        my = np.array([y[b].mean() for b in bins])
        half = np.array([1.96 * np.sqrt(max(m * (1 - m), 1e-9) / len(b)) for m, b in zip(mp, bins)])
        ax.errorbar(mp, my, yerr=half, fmt="o-", ms=4, capsize=2,
                    label=f"{model_type} (ECE {ece(p, y, n_bins=N_BINS):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.set_xlabel("predicted churn probability (bin mean)")
    ax.set_ylabel("observed churn rate")
    ax.set_title(f"Telco, pooled 5-fold out-of-fold ({len(y)} customers, {N_BINS} equal-mass bins)\n"
                 "bars: 95% binomial range of a calibrated bin", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(d: dict[str, float], digits: int = 4) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# AccountHealthPredictor", ""]
    t = result.get("telco")
    if t:
        lines += [(f"Telco churn, {t['rows']} customers (churn {t['churn_rate']:.3f}); stratified 80/20 splits, "
                   f"mean ± sd over {t['models'][MODEL_TYPES[0]]['summary']['auc']['n']} seeds; "
                   f"ECE over {t['n_bins']} equal-mass bins."), "",
                  ("| model | AUC | ECE | ECE of a perfectly calibrated model (floor) | floor p95 | calibration test p | "
                   "pooled OOF ECE (7043 rows) | its floor |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, r in t["models"].items():
            s, po = r["summary"], r["pooled_out_of_fold"]
            lines.append(f"| {m} | {_ms(s['auc'])} | {_ms(s['ece'])} | {_ms(s['ece_floor_mean'])} | "
                         f"{_ms(s['ece_floor_p95'])} | {_ms(s['ece_test_p'], 2)} | {po['ece']:.4f} | "
                         f"{po['ece_floor_mean']:.4f} |")
    s = result.get("simulator")
    if s:
        lines += ["", (f"Simulator accounts ({s['world']['n_accounts']} accounts x {s['months']} months, "
                       f"mean ± sd over {s['models'][MODEL_TYPES[0]]['summary']['auc']['n']} worlds), "
                       "test on held-out accounts."), "",
                  ("| model | AUC | oracle AUC | ece_true | true factors in top 5 | Spearman(mean abs SHAP, truth) | "
                   "top-1 factor per account | top-3 overlap |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, r in s["models"].items():
            q = r["summary"]
            lines.append(f"| {m} | {_ms(q['auc'])} | {_ms(q['oracle_auc'])} | {_ms(q['ece_true'])} | "
                         f"{_ms(q['true_factors_in_top5'], 2)} | {_ms(q['spearman_mean_abs_shap_vs_truth'], 3)} | "
                         f"{_ms(q['per_account_top1_agreement'], 3)} | {_ms(q['per_account_top3_overlap'], 3)} |")
        lines += ["", "Correlation of each true factor's SHAP value with its true term COEF * (x - mean):", "",
                  "| model | " + " | ".join(CHURN_COEF) + " |", "| --- | " + " | ".join("---" for _ in CHURN_COEF) + " |"]
        for m, r in s["models"].items():
            fc = r["summary"]["factor_corr"]
            lines.append(f"| {m} | " + " | ".join(_ms(fc[c], 3) for c in CHURN_COEF) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--worlds", type=int, default=5)
    ap.add_argument("--sections", default="telco,simulator")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {"machine": machine(), "note": "shared 2-core machine; timings are indicative only"}
    if "telco" in sections:
        result["telco"], pooled = section_telco(args.seeds)
        reliability_plot(pooled, RESULTS / f"{NAME}_reliability.png")
    if "simulator" in sections:
        result["simulator"] = section_simulator(args.worlds)
    path = write_json(NAME, result)
    (RESULTS / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
