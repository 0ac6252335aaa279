"""What the post-fit steps add to the test report: interval coverage, per-field RCE before and after
calibration, and the report.md sections that show them. Called from the pipeline's test scoring."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from within.postfit.context import PostfitContext, labels_of
from within.postfit.intervals import interval_metrics


def postfit_test_metrics(ctx: PostfitContext, frame: pd.DataFrame, split: str = "test") -> dict[str, float]:
    """Interval coverage/width at the configured alpha and Field-RCE of the uncalibrated model per level."""
    from within.calibration.metrics import REPORT_MIN_CLICKS, field_rce

    alpha = float(ctx.settings("intervals").get("alpha", 0.1))
    out = interval_metrics(ctx.model, frame, split, alpha)
    model = ctx.model
    if model.calibrator is not None:
        y, w = labels_of(model, frame)
        raw = 1.0 / (1.0 + np.exp(-model.predict_logits(frame)))
        for f in model.spec.groups:
            if f.name in frame:
                out[f"{split}/field_rce_uncalibrated/{f.name}"] = field_rce(raw, y, frame[f.name].to_numpy(), w, min_clicks=REPORT_MIN_CLICKS)
    return out


def report_sections(metrics: dict[str, float], split: str = "test", alpha: float = 0.1) -> dict[str, Any]:
    """report.md sections: Field-RCE per group level (before/after calibration) and interval coverage."""
    sections: dict[str, Any] = {}
    prefix = f"{split}/field_rce/"
    levels = sorted(k[len(prefix):] for k in metrics if k.startswith(prefix))
    if levels:
        rows = ["| field | Field-RCE (calibrated) | Field-RCE (uncalibrated) |", "| --- | --- | --- |"]
        for lvl in levels:
            raw = metrics.get(f"{split}/field_rce_uncalibrated/{lvl}")
            rows.append(f"| `{lvl}` | {metrics[prefix + lvl]:.4f} | {'-' if raw is None else f'{raw:.4f}'} |")
        sections["Field-level relative calibration error (Pan et al., 2020)"] = "\n".join(rows)
    if f"{split}/interval_width" in metrics:
        cov = metrics.get(f"{split}/interval_coverage_true")
        lines = [f"Central {1 - alpha:.0%} intervals for the true click probability (ProbabilityIntervals: "
                 "the true logit regressed on the score, a Berkson model, with its spread estimated from "
                 "val + calib rows that share a unit; see within/calibration/intervals.py).", "",
                 f"- mean width: {metrics[f'{split}/interval_width']:.5f}"]
        lines.append(f"- coverage of the true CTR: {cov:.4f} (target {1 - alpha:.2f})" if cov is not None
                     else "- coverage of the true CTR: no truth column in this data")
        if "intervals/tau2_se" in metrics:
            lines.append(f"- spread of the true logit around the score: tau^2 = {metrics['intervals/tau2']:.4f} "
                         f"+- {metrics['intervals/tau2_se']:.4f} (moment noise); one standard error either way "
                         f"would give coverage {metrics['intervals/coverage_band_low']:.2f} to "
                         f"{metrics['intervals/coverage_band_high']:.2f}")
        sections["Prediction intervals"] = "\n".join(lines)
    return sections
