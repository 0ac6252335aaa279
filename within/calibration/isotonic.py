"""Isotonic calibration (Zadrozny & Elkan, KDD 2002), via sklearn's IsotonicRegression (PAV)."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression

from within.calibration.base import Calibrator, check_labels, check_scores, logit, register


@register("isotonic")
class IsotonicCalibrator(Calibrator):
    """Non-decreasing step map from logit to click rate, fitted by pool-adjacent-violators with
    impression weights; out-of-range logits are clipped to the end values. Stored as the
    (threshold, value) knots, and applied by linear interpolation exactly as sklearn does."""

    def __init__(self) -> None:
        self.x_: np.ndarray = np.zeros(0)
        self.y_: np.ndarray = np.zeros(0)

    def fit(self, scores: Any, y: Any, groups: dict | None = None, weight: Any = None) -> IsotonicCalibrator:
        s = check_scores(scores)
        clicks, imps = check_labels(y, s.shape[0], weight)
        keep = imps > 0
        rate = np.divide(clicks, imps, out=np.zeros_like(clicks), where=keep)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(s[keep], rate[keep], sample_weight=imps[keep])
        self.x_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_ = np.asarray(iso.y_thresholds_, dtype=np.float64)
        self.fitted_ = True
        return self

    def transform(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        self._require_fitted()
        return np.interp(check_scores(scores), self.x_, self.y_)

    def transform_logit(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        return logit(self.transform(scores, groups))

    def _params(self) -> dict[str, Any]:
        return {}

    def _state(self) -> dict[str, Any]:
        return {"x": self.x_.tolist(), "y": self.y_.tolist()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.x_ = np.asarray(state["x"], dtype=np.float64)
        self.y_ = np.asarray(state["y"], dtype=np.float64)
        if self.x_.shape != self.y_.shape or self.x_.size == 0:
            raise ValueError("isotonic state: 'x' and 'y' must be equal-length non-empty lists")
