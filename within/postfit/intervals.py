"""Post-fit step `intervals`: intervals for the TRUE click probability, fitted on the calib split.

`ProbabilityIntervals` expects raw model logits (not logits a calibrator already shrank); with an
ensemble it also takes the member logits, whose spread says which rows are noisier.
"""
from __future__ import annotations

import numpy as np

from within.postfit.context import PostfitContext, labels_of


class Intervals:
    """Fit ProbabilityIntervals on the calib split's raw logits and store it on the predictor."""

    name = "intervals"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.intervals import ProbabilityIntervals

        settings = ctx.settings("intervals")
        alpha = float(settings.get("alpha", 0.1))
        split, frame = ctx.calibration_frame()
        logits, members = ctx.predictor.logits_with_members(frame)
        y, w = labels_of(ctx.predictor, frame)
        intervals = ProbabilityIntervals(max_fit_rows=int(settings.get("max_fit_rows", 200_000)),
                                         seed=int(settings.get("seed", 0)))
        intervals.fit(logits, y, member_logits=members, weight=w)
        ctx.predictor.intervals = intervals
        ctx.metrics.update(interval_metrics(ctx.predictor, frame, split, alpha))
        ctx.metadata["intervals"] = {"split": split, "alpha": alpha, "uses_members": members is not None,
                                     "params": intervals.params_}


def interval_metrics(predictor, frame, split: str = "test", alpha: float = 0.1) -> dict[str, float]:
    """Mean interval width and, where the frame has the simulator truth, coverage of the true CTR."""
    from within.calibration.intervals import coverage, mean_width

    if getattr(predictor, "intervals", None) is None:
        return {}
    _, lo, hi = predictor.predict_with_intervals(frame, alpha=alpha)
    out = {f"{split}/interval_width": mean_width(lo, hi)}
    spec = predictor.processor.spec
    if spec.truth and spec.truth in frame:
        out[f"{split}/interval_coverage_true"] = coverage(lo, hi, frame[spec.truth].to_numpy(dtype=np.float64))
    return out
