"""Post-fit step `calibrate`: fit the configured calibrator on held-out logits."""
from __future__ import annotations

import numpy as np

from within.postfit.context import PostfitContext, labels_of


class Calibrate:
    """Fit the configured calibrator on the calib split's logits; report calibration before and after."""

    name = "calibrate"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.metrics import ece

        if ctx.calibrator_factory is None:
            ctx.predictor.calibrator = None
            return
        split, frame = ctx.calibration_frame()
        logits = ctx.predictor.predict_logits(frame)
        y, w = labels_of(ctx.predictor, frame)
        calibrator = ctx.calibrator_factory()
        ctx.predictor.calibrator = None
        groups = None
        if getattr(calibrator, "required_columns", None) or ctx.predictor.processor.spec.groups:
            ctx.predictor.calibrator = calibrator  # so group_columns knows what it needs
            groups = ctx.predictor.group_columns(frame)
        calibrator.fit(logits, y, groups=groups, weight=w)
        ctx.predictor.calibrator = calibrator
        before = 1.0 / (1.0 + np.exp(-logits))
        after = calibrator.transform(logits, groups=groups)
        ctx.metrics[f"{split}/ece_uncalibrated"] = float(ece(before, y, weight=w))
        ctx.metrics[f"{split}/ece_calibrated"] = float(ece(after, y, weight=w))
        ctx.metadata["calibration"] = {"split": split, "type": calibrator.to_dict().get("type")}
