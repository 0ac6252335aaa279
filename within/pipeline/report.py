"""Scoring a model on a frame, and the run report: metrics.json, report.md, index.html and PNG plots.

train.py and evaluate.py both write the test report through `write_test_report` (and score through
`score_frame`), so their numbers agree exactly. `write_report_pages` writes report.md and its
self-contained HTML twin, index.html (within/pipeline/html_report.py), from the same content.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from within.calibration.metrics import binary_report
from within.features.spec import FeatureSpec


def score_frame(model: Any, df: pd.DataFrame, split: str = "test",
                spec: FeatureSpec | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Flat `split/name` metrics of the model on a labelled frame, plus its probabilities
    (`spec`: the rows' schema, for a model without one of its own)."""
    spec = spec or model.spec
    p = np.asarray(model.predict(df), dtype=np.float64)
    y = df[spec.label].to_numpy(dtype=np.float64)
    weight = df[spec.weight].to_numpy(dtype=np.float64) if spec.weight else None
    groups = {f.name: df[f.name].to_numpy() for f in spec.groups if f.name in df}
    truth = df[spec.truth].to_numpy(dtype=np.float64) if spec.truth and spec.truth in df else None
    report = binary_report(p, y, weight=weight, groups=groups or None, truth=truth)
    return {f"{split}/{k}": float(v) for k, v in report.items()}, p


def write_test_report(model: Any, frame: pd.DataFrame, report_dir: Path, split: str = "test",
                      history: list[dict[str, float]] | None = None, metrics: dict[str, float] | None = None,
                      extra_metrics: Any = None, sections: Any = None, spec: FeatureSpec | None = None) -> dict[str, float]:
    """The test report, the one sequence for every model kind and for evaluate.py: score the frame,
    draw the reliability diagram (calibrated and raw, against observed and, on the simulator, true
    CTR) and the training curve, then write metrics.json and report.md.

    `metrics`: the run's metrics so far, updated in place with everything the report holds;
    `extra_metrics(frame) -> dict` and `sections(metrics) -> dict` add what the post-fit steps know.
    Returns the split's own scores (what the loggers record).
    """
    out = metrics if metrics is not None else {}
    spec = spec or model.spec
    scored, p = score_frame(model, frame, split, spec)
    out.update(scored)
    y = frame[spec.label].to_numpy(dtype=float)
    truth = frame[spec.truth].to_numpy(dtype=float) if spec.truth and spec.truth in frame else None
    weight = frame[spec.weight].to_numpy(dtype=float) if spec.weight else None
    calibrated = getattr(model, "calibrator", None) is not None
    curves = {"calibrated" if calibrated else "model": p}
    if calibrated:
        curves["uncalibrated"] = 1.0 / (1.0 + np.exp(-model.predict_logits(frame)))
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_reliability(curves, y, report_dir / "reliability.png", truth=truth, weight=weight)
    if history:
        plot_training_curve(history, report_dir / "training_curve.png")
        (report_dir / "history.json").write_text(json.dumps(history, indent=1))  # the curve's numbers
    plot_region_map(getattr(model, "calibrator", None), report_dir / "region_map.png")
    if extra_metrics is not None:
        out.update(extra_metrics(frame))
    write_metrics(out, report_dir)
    write_report_pages(report_dir, out, extra=sections(out) if sections is not None else None)
    return scored


def write_report_pages(report_dir: Path, metrics: dict[str, float], extra: dict[str, Any] | None = None) -> Path:
    """report.md and index.html (the same sections; the HTML with its plots inlined); returns index.html."""
    from within.pipeline.html_report import write_html_report

    write_markdown(report_dir, metrics, extra=extra)
    return write_html_report(report_dir, metrics, extra=extra)


def plot_region_map(calibrator: Any, path: Path) -> Path | None:
    """The geospatial calibrator's region map (GeospatialCalibrator.plot_region_map), when the model
    has one fitted with latitude / longitude; else None (and no file)."""
    draw = getattr(calibrator, "plot_region_map", None)
    if draw is None or getattr(calibrator, "region_lat_", None) is None:
        return None
    return Path(draw(path))


def write_metrics(metrics: dict[str, float], report_dir: Path) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "metrics.json"
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sorted(metrics.items())}
    path.write_text(json.dumps(clean, indent=2))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(
    curves: dict[str, np.ndarray], y: np.ndarray, path: Path, truth: np.ndarray | None = None,
    weight: np.ndarray | None = None, n_bins: int = 15,
) -> Path:
    """Reliability diagram over equal-mass bins: mean predicted vs observed CTR (and vs true CTR)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    w = np.ones_like(y) if weight is None else weight
    top = 0.0
    for label, p in curves.items():
        order = np.argsort(p, kind="stable")
        bins = np.array_split(order, n_bins)
        mp = np.array([np.average(p[b], weights=w[b]) for b in bins])
        obs = np.array([y[b].sum() / w[b].sum() for b in bins])
        ax.plot(mp, obs, "o-", label=f"{label}: observed")
        if truth is not None:
            tr = np.array([np.average(truth[b], weights=w[b]) for b in bins])
            ax.plot(mp, tr, "x--", label=f"{label}: true CTR")
        top = max(top, mp.max(), obs.max())
    ax.plot([0, top], [0, top], color="grey", lw=1, label="perfect")
    ax.set_xlabel("mean predicted CTR (equal-mass bins)")
    ax.set_ylabel("CTR")
    ax.set_title("Reliability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curve(rows: list[dict[str, float]], path: Path) -> Path | None:
    if not rows:
        return None
    plt = _plt()
    hist = pd.DataFrame(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train/loss", "val/logloss"):
        if key in hist:
            ax1.plot(hist["epoch"], hist[key], "o-", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("log loss")
    if ax1.lines:
        ax1.legend()
    if "val/auc" in hist:
        ax2.plot(hist["epoch"], hist["val/auc"], "o-", color="tab:green", label="val/auc")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("AUC")
        ax2.legend()
    fig.suptitle("Training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_markdown(report_dir: Path, metrics: dict[str, float], extra: dict[str, Any] | None = None) -> Path:
    lines = ["# Run report", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v:.5f} |" for k, v in sorted(metrics.items()) if isinstance(v, float)]
    for title, body in (extra or {}).items():
        lines += ["", f"## {title}", "", str(body)]
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in pngs]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
