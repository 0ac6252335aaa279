"""Post-fit step `calibrate`: fit the configured calibrator on held-out logits."""
from __future__ import annotations

import numpy as np

from within.postfit.context import PostfitContext, labels_of


class Calibrate:
    """Fit the configured calibrator on the calib split's logits; report calibration before and after."""

    name = "calibrate"

    @staticmethod
    def skip_reason(model) -> str | None:
        if callable(getattr(model, "group_columns", None)) and callable(getattr(model, "predict_logits", None)):
            return None
        return f"{type(model).__name__} calibrates itself (it has no logits for a pipeline calibrator)"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.metrics import ece

        model = ctx.model
        if ctx.calibrator_factory is None:
            model.calibrator = None
            return
        split, frame = ctx.calibration_frame()
        logits = model.predict_logits(frame)
        y, w = labels_of(model, frame)
        calibrator = ctx.calibrator_factory()
        groups = model.group_columns(frame, calibrator)
        calibrator.fit(logits, y, groups=groups, weight=w)
        model.calibrator = calibrator
        before = 1.0 / (1.0 + np.exp(-logits))
        after = calibrator.transform(logits, groups=groups)
        ctx.metrics[f"{split}/ece_uncalibrated"] = float(ece(before, y, weight=w))
        ctx.metrics[f"{split}/ece_calibrated"] = float(ece(after, y, weight=w))
        ctx.metadata["calibration"] = {"split": split, "type": calibrator.to_dict().get("type")}
