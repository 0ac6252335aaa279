"""Platt scaling (Platt, 1999, "Probabilistic Outputs for Support Vector Machines")."""
from __future__ import annotations

from typing import Any

import numpy as np

from within.calibration._affine import fit_affine
from within.calibration.base import Calibrator, check_labels, check_scores, register


@register("platt")
class PlattScaling(Calibrator):
    """p = sigmoid(a * s + b) by binomial maximum likelihood, slope a constrained > 0 so the
    ranking is kept. `smooth_targets=True` uses Platt's regularised targets
    (N+ + 1)/(N+ + 2) and 1/(N- + 2) instead of 1/0, which guards against overfit on small sets."""

    def __init__(self, smooth_targets: bool = True) -> None:
        self.smooth_targets = bool(smooth_targets)
        self.slope_ = 1.0
        self.bias_ = 0.0

    def fit(self, scores: Any, y: Any, groups: dict | None = None, weight: Any = None) -> PlattScaling:
        s = check_scores(scores)
        clicks, imps = check_labels(y, s.shape[0], weight)
        if self.smooth_targets:
            n_pos, n_neg = clicks.sum(), (imps - clicks).sum()
            t_pos, t_neg = (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)
            clicks = clicks * t_pos + (imps - clicks) * t_neg
        self.slope_, self.bias_ = fit_affine(s, clicks, imps, fit_bias=True)
        self.fitted_ = True
        return self

    def transform_logit(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        self._require_fitted()
        return self.slope_ * check_scores(scores) + self.bias_

    def _params(self) -> dict[str, Any]:
        return {"smooth_targets": self.smooth_targets}

    def _state(self) -> dict[str, Any]:
        return {"slope": self.slope_, "bias": self.bias_}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.slope_ = float(state["slope"])
        self.bias_ = float(state["bias"])
