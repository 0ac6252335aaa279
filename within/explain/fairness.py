"""Fairness by demographic group: per-group AUC, calibration, mean score, and fairlearn's
demographic-parity and equalized-odds differences.

The groups are the values of each field the feature spec marks `demographic: true` (age band,
gender, ...). Per group, with fairlearn's MetricFrame over within's own metrics
(within/calibration/metrics.py):

- auc, ece (equal-mass bins), calibration_ratio (predicted / observed clicks), mean_score and
  observed_ctr (impression-weighted), rows / impressions / clicks; ece_true where the data
  carries the true CTR (simulator), and ece_of_true_ctr, the ECE of the true CTR itself against
  the clicks: the part of a group's ece that no model can remove (label noise);
- demographic_parity_difference: the largest gap between groups in the share of impressions
  selected; equalized_odds_difference: the largest gap in true- or false-positive rate.

Both differences need a yes/no decision. A CTR model has no natural cut: its scores sit near
the base rate (~3%), so the usual 0.5 would select no impression and make both differences 0.
The default decision is "predicted CTR above the overall observed CTR" (above-average traffic,
what a bidder would favour); pass `threshold` for your own cut. Aggregated rows (clicks out of
impressions) enter as a click part and a non-click part, weighted by their counts.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from within.calibration.metrics import auc, calibration_ratio, ece, ece_true
from within.explain.inputs import spec_of
from within.features.spec import FeatureSpec

THRESHOLD_RULE = ("predicted CTR above the overall observed CTR (CTR scores sit near the base rate, so a 0.5 cut "
                  "would select nothing and make both differences 0)")
RATES = ("auc", "ece", "ece_true", "calibration_ratio", "mean_score", "observed_ctr")  # max - min over groups
REPORT_FILE = "fairness.json"
PLOT_FILE = "fairness.png"


def demographic_fields(spec: FeatureSpec, fields: list[str] | None = None) -> list[str]:
    """The fields to compare: `fields` if given (each must be in the spec), else the spec's demographic ones."""
    if fields:
        unknown = [f for f in fields if f not in spec.names]
        if unknown:
            raise ValueError(f"fairness.fields: {unknown} are not fields of the feature spec; choose from {spec.names}")
        return list(fields)
    marked = [f.name for f in spec.demographic]
    if not marked:
        raise ValueError("fairness: the feature spec marks no field demographic; add `demographic: true` to the "
                         "categorical or group fields to compare (e.g. age_band, gender), or pass fields=[...]")
    return marked


def _metric_functions(n_bins: int, with_truth: bool) -> dict[str, Any]:
    # fairlearn calls metric(y_true, y_pred, **sample_params); within's metrics take (p, y, weight)
    out = {
        "auc": lambda y, p, weight: auc(p, y, weight),
        "ece": lambda y, p, weight: ece(p, y, n_bins=n_bins, weight=weight),
        "calibration_ratio": lambda y, p, weight: calibration_ratio(p, y, weight),
        "mean_score": lambda y, p, weight: float(np.sum(weight * p) / np.sum(weight)),
        "observed_ctr": lambda y, p, weight: float(np.sum(y) / np.sum(weight)),
        "rows": lambda y, p, weight: float(len(y)),
        "impressions": lambda y, p, weight: float(np.sum(weight)),
        "clicks": lambda y, p, weight: float(np.sum(y)),
    }
    if with_truth:
        out["ece_true"] = lambda y, p, weight, truth: ece_true(p, truth, n_bins=n_bins)
        # the ECE the true CTR itself scores against the clicks: how much of `ece` is label noise
        out["ece_of_true_ctr"] = lambda y, p, weight, truth: ece(truth, y, n_bins=n_bins, weight=weight)
    return out


def _decision_rows(p: np.ndarray, y: np.ndarray, w: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """(binary label, decision, weight, row index): each row's clicks and non-clicks as two weighted rows."""
    idx = np.concatenate([np.arange(len(p)), np.arange(len(p))])
    label = np.concatenate([np.ones(len(p)), np.zeros(len(p))])
    weight = np.concatenate([y, w - y])
    keep = weight > 0
    return label[keep], (p[idx] > threshold)[keep].astype(np.int64), weight[keep], idx[keep]


def fairness_metrics(
    p: Any,
    y: Any,
    sensitive: Mapping[str, Any],
    weight: Any = None,
    truth: Any = None,
    threshold: float | None = None,
    n_bins: int = 10,
) -> dict[str, Any]:
    """The report for scores `p` (calibrated probabilities) of rows with clicks `y` (0/1, or counts
    with `weight` = impressions), grouped by each array in `sensitive` ({field: values [N]})."""
    from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference

    p = np.asarray(p, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    w = np.ones_like(p) if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
    if not (len(y) == len(w) == len(p)):
        raise ValueError(f"fairness: p, y and weight need one entry per row, got {len(p)}, {len(y)}, {len(w)}")
    if threshold is None:
        threshold = float(y.sum() / w.sum())
        rule = THRESHOLD_RULE
    else:
        rule = "given"
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"fairness.threshold: must be a probability in (0, 1), got {threshold}")
    metrics = _metric_functions(n_bins, truth is not None)
    params = {name: {"weight": w} for name in metrics}
    if truth is not None:
        for name in ("ece_true", "ece_of_true_ctr"):
            params[name]["truth"] = np.asarray(truth, dtype=np.float64).reshape(-1)
    label, decision, dweight, rows = _decision_rows(p, y, w, float(threshold))
    report: dict[str, Any] = {
        "threshold": float(threshold), "threshold_rule": rule, "n_bins": n_bins, "fields": {},
        "overall": {k: fn(y, p, **params[k]) for k, fn in metrics.items()},
    }
    for field, values in sensitive.items():
        groups = pd.Series(np.asarray(values).astype(str), name=field)
        if len(groups) != len(p):
            raise ValueError(f"fairness: sensitive[{field!r}] has {len(groups)} values for {len(p)} rows")
        frame = MetricFrame(metrics=metrics, y_true=y, y_pred=p, sensitive_features=groups, sample_params=params)
        by_group = frame.by_group
        cut = groups.to_numpy()[rows]
        report["fields"][field] = {
            "groups": {str(g): {k: float(v) for k, v in row.items()} for g, row in by_group.iterrows()},
            "difference": {k: float(v) for k, v in frame.difference().items() if k in RATES},
            "demographic_parity_difference": float(demographic_parity_difference(
                label, decision, sensitive_features=cut, sample_weight=dweight)),
            "equalized_odds_difference": float(equalized_odds_difference(
                label, decision, sensitive_features=cut, sample_weight=dweight)),
        }
    report["worst_group"] = worst_group(report)
    return report


def worst_group(report: Mapping[str, Any], metric: str = "ece") -> dict[str, Any]:
    """The group with the largest `metric` over every field."""
    field, group, value = max(((f, g, m[metric]) for f, data in report["fields"].items()
                               for g, m in data["groups"].items()), key=lambda t: t[2])
    return {"field": field, "group": group, metric: value}


def fairness_report(model: Any, frame: pd.DataFrame, fields: list[str] | None = None,
                    threshold: float | None = None, n_bins: int = 10) -> dict[str, Any]:
    """`fairness_metrics` for a fitted model's calibrated probabilities on a labelled frame."""
    spec = spec_of(model)
    fields = demographic_fields(spec, fields)
    missing = [c for c in [spec.label, *fields] + ([spec.weight] if spec.weight else []) if c not in frame]
    if missing:
        raise ValueError(f"fairness: the frame lacks columns {missing}; pass labelled rows with the demographic fields")
    truth = frame[spec.truth].to_numpy() if spec.truth and spec.truth in frame else None
    return fairness_metrics(
        np.asarray(model.predict(frame), dtype=np.float64), frame[spec.label].to_numpy(),
        {f: frame[f].to_numpy() for f in fields}, weight=frame[spec.weight].to_numpy() if spec.weight else None,
        truth=truth, threshold=threshold, n_bins=n_bins,
    )


def write_fairness_report(data: Mapping[str, Any], out_dir: str | Path) -> Path:
    """out_dir/fairness.json (NaN as null)."""
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    return path


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not np.isfinite(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


PLOTTED = (("calibration_ratio", "calibration ratio (pred / obs clicks)", 1.0), ("ece", "ECE", None),
           ("auc", "AUC", None), ("mean_score", "mean score (x: observed CTR)", None))


def plot_fairness(report: Mapping[str, Any], path: str | Path, after: Mapping[str, Any] | None = None,
                  labels: tuple[str, str] = ("model", "per-group calibrated")) -> Path:
    """One row per demographic field, one panel per metric, a bar per group (two with `after`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(report["fields"])
    fig, axes = plt.subplots(len(fields), len(PLOTTED), figsize=(4 * len(PLOTTED), 2.8 * len(fields)), squeeze=False)
    for r, field in enumerate(fields):
        groups = list(report["fields"][field]["groups"])
        x = np.arange(len(groups))
        sets = [(report, labels[0])] + ([(after, labels[1])] if after is not None else [])
        width = 0.8 / len(sets)
        for c, (metric, title, ref) in enumerate(PLOTTED):
            ax = axes[r, c]
            for k, (rep, label) in enumerate(sets):
                vals = [rep["fields"][field]["groups"][g][metric] for g in groups]
                ax.bar(x + (k - (len(sets) - 1) / 2) * width, vals, width, label=label)
            if metric == "mean_score":
                obs = [report["fields"][field]["groups"][g]["observed_ctr"] for g in groups]
                ax.scatter(x, obs, color="black", marker="x", zorder=3, label="observed CTR")
            if ref is not None:
                ax.axhline(ref, color="grey", lw=0.8, ls="--")
            ax.set_xticks(x, groups, rotation=30, fontsize=8)
            ax.set_title(f"{field}: {title}", fontsize=9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Fairness by group (decisions for parity/odds: p > {report['threshold']:.4f})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
