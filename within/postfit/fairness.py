"""Post-fit step `fairness`: the fairness report by demographic group on the test split, and what
calibrating per group does to each group's calibration.

Per-group calibration is a HierarchicalCalibrator over the demographic fields (nested in spec
order: age band, then gender within age band; each offset shrunk toward its parent by empirical
Bayes), fitted on the calib split on top of the model's own calibrated logit, so the before/after
comparison isolates the per-group offsets. Nothing is fitted on test. The bundle keeps the run's
calibrator: a bundle cannot yet chain two calibrators, so the step reports the effect and the
fitted offsets rather than installing them.

Settings (top-level `fairness:` node, all optional): fields (default: the spec's demographic
fields), threshold (decision cut for parity / equalized odds; default the observed CTR),
n_bins (ECE bins per group, default 10).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from within.postfit.context import PostfitContext, labels_of


def fit_group_calibrator(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None, groups: dict[str, np.ndarray],
                         fields: list[str]) -> Any:
    """Temperature (with bias) plus shrunken offsets per demographic group, on calibrated logits."""
    from within.calibration.hierarchical import HierarchicalCalibrator

    return HierarchicalCalibrator(hierarchy_levels=fields, calibration_method="temperature").fit(
        logits, y, groups=groups, weight=w)


def _calibrated(predictor: Any, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(probability, logit) of the model as it stands, its own calibrator included."""
    from within.calibration.base import logit

    p = np.asarray(predictor.predict(frame), dtype=np.float64)
    return p, logit(p)


def _effect(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    keys = ("ece", "calibration_ratio") + (("ece_true",) if "ece_true" in before["overall"] else ())
    return {field: {group: {f"{k}_{when}": rep["fields"][field]["groups"][group][k]
                            for k in keys for when, rep in (("before", before), ("after", after))}
                    for group in data["groups"]}
            for field, data in before["fields"].items()}


class Fairness:
    """Fairness report on test, before and after per-group calibration (fitted on calib)."""

    name = "fairness"

    @staticmethod
    def skip_reason(model) -> str | None:
        spec = getattr(model, "spec", None)
        if spec is None:
            return f"{type(model).__name__} has no feature spec to find the demographic fields in"
        return None

    def run(self, ctx: PostfitContext) -> None:
        from within.explain.fairness import (
            demographic_fields,
            fairness_metrics,
            plot_fairness,
            worst_group,
            write_fairness_report,
        )

        settings = ctx.settings("fairness")
        predictor = ctx.model
        spec = predictor.spec
        fields = demographic_fields(spec, settings.get("fields"))
        split, calib = ctx.calibration_frame()
        test = ctx.frames["test"]
        y_cal, w_cal = labels_of(predictor, calib)
        group_cal = fit_group_calibrator(_calibrated(predictor, calib)[1], y_cal, w_cal,
                                         {f: calib[f].to_numpy() for f in fields}, fields)
        y, w = labels_of(predictor, test)
        groups = {f: test[f].to_numpy() for f in fields}
        truth = test[spec.truth].to_numpy() if spec.truth and spec.truth in test else None
        p_test, test_logit = _calibrated(predictor, test)
        options = {"weight": w, "truth": truth, "threshold": settings.get("threshold"),
                   "n_bins": int(settings.get("n_bins", 10))}
        before = fairness_metrics(p_test, y, groups, **options)
        after = fairness_metrics(group_cal.transform(test_logit, groups=groups), y, groups,
                                 **{**options, "threshold": before["threshold"]})
        worst = {"before": worst_group(before), "after": worst_group(after)}
        report = {
            "split": "test", "calibration_split": split, "fields": fields, "before": before, "after": after,
            "per_group_calibration": {"fitted_on": split, "mapping": group_cal.get_calibration_mapping(),
                                      "installed_in_bundle": False},
            "effect": _effect(before, after), "worst_group_ece": worst,
        }
        write_fairness_report(report, ctx.report_dir)
        plot_fairness(before, ctx.report_dir / "fairness.png", after=after)
        # the worst group's ECE (max over every group) before and after; and that same group after
        ctx.metrics["fairness/worst_group_ece"] = worst["before"]["ece"]
        ctx.metrics["fairness/worst_group_ece_after"] = worst["after"]["ece"]
        ctx.metrics["fairness/same_group_ece_after"] = (
            after["fields"][worst["before"]["field"]]["groups"][worst["before"]["group"]]["ece"])
        for field in fields:
            for key in ("demographic_parity_difference", "equalized_odds_difference"):
                ctx.metrics[f"fairness/{field}/{key}"] = before["fields"][field][key]
        ctx.metadata["fairness"] = {"fields": fields, "calibration_split": split, "threshold": before["threshold"]}
