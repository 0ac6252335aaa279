"""Post-fit step `attribution`: global feature importance on the test split, for the run report.

Mean |attribution| per field and per modality, on the logit scale, over `n_rows` test rows, each
explained against the bundle's reference sample of training rows. This is the explainer behind
AdScorePredictor.get_feature_importance (within/explain), which averages over the reference itself.
Writes report/attribution.json and report/attribution.png; nothing is fitted, nothing is installed.

Settings (top-level `attribution:` node, all optional): n_rows (default 200), method (auto |
gradient | permutation; auto picks expected gradients for networks), seed (default the run's seed).
"""
from __future__ import annotations

import json
from typing import Any

from within.postfit.context import PostfitContext


class Attribution:
    """Mean |attribution| per field over test rows, against the reference sample."""

    name = "attribution"

    @staticmethod
    def skip_reason(model: Any) -> str | None:
        if getattr(model, "spec", None) is None:
            return f"{type(model).__name__} has no feature spec to attribute to"
        if getattr(model, "reference", None) is None:
            return "the bundle holds no reference sample (explain.reference_rows=0)"
        return None

    def run(self, ctx: PostfitContext) -> None:
        from within.explain import explain
        from within.explain.explanation import FeatureImportance
        from within.explain.plots import plot_importance

        settings = ctx.settings("attribution")
        n_rows = int(settings.get("n_rows", 200))
        if n_rows < 1:
            raise ValueError(f"attribution.n_rows must be >= 1, got {n_rows}")
        seed = int(settings.get("seed", (ctx.config or {}).get("seed", 0)) or 0)
        frame = ctx.scoring_frame()
        rows = frame.sample(min(n_rows, len(frame)), random_state=seed)
        explanation = explain(ctx.model, rows, ctx.model.reference, method=str(settings.get("method", "auto")),
                              seed=seed)
        importance = FeatureImportance.from_explanation(explanation)
        split = "test" if ctx.frames.get("test") is not None and len(ctx.frames["test"]) else "calibration"
        report = {"split": split, "reference_rows": len(ctx.model.reference), **importance.to_dict()}
        (ctx.report_dir / "attribution.json").write_text(json.dumps(report, indent=2))
        plot_importance(importance, ctx.report_dir / "attribution.png", rows_label=f"{split} rows")
        for modality, value in importance.modality_importance.items():
            ctx.metrics[f"attribution/{modality}"] = float(value)
        ctx.metadata["attribution"] = {"split": split, "n_rows": importance.n_rows, "method": importance.method,
                                       "top_field": str(importance.importance.index[0])}
