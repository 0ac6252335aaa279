"""The "none" calibrator: probabilities are sigmoid(logits), nothing is fitted."""
from __future__ import annotations

from typing import Any

import numpy as np

from within.calibration.base import Calibrator, check_labels, check_scores, register


@register("none")
class IdentityCalibrator(Calibrator):
    """p = sigmoid(s). Fitting only checks the inputs, so a pipeline can treat it like any other."""

    def fit(self, scores: Any, y: Any, groups: dict | None = None, weight: Any = None) -> IdentityCalibrator:
        s = check_scores(scores)
        check_labels(y, s.shape[0], weight)
        self.fitted_ = True
        return self

    def transform_logit(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        return check_scores(scores)

    def _params(self) -> dict[str, Any]:
        return {}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        return None
