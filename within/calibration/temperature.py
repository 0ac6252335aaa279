"""Temperature scaling (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks")."""
from __future__ import annotations

from typing import Any

import numpy as np

from within.calibration._affine import fit_affine
from within.calibration.base import Calibrator, check_labels, check_scores, register


@register("temperature")
class TemperatureScaling(Calibrator):
    """p = sigmoid(s / T [+ b]), T > 0 fitted by binomial maximum likelihood (L-BFGS-B on 1/T,
    where the NLL is convex). `fit_bias=True` adds an intercept for base-rate shift."""

    def __init__(self, fit_bias: bool = False) -> None:
        self.fit_bias = bool(fit_bias)
        self.temperature_ = 1.0
        self.bias_ = 0.0

    def fit(self, scores: Any, y: Any, groups: dict | None = None, weight: Any = None) -> TemperatureScaling:
        s = check_scores(scores)
        clicks, imps = check_labels(y, s.shape[0], weight)
        inv_t, self.bias_ = fit_affine(s, clicks, imps, fit_bias=self.fit_bias)
        self.temperature_ = 1.0 / inv_t
        self.fitted_ = True
        return self

    def transform_logit(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        self._require_fitted()
        return check_scores(scores) / self.temperature_ + self.bias_

    def _params(self) -> dict[str, Any]:
        return {"fit_bias": self.fit_bias}

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature_, "bias": self.bias_}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.temperature_ = float(state["temperature"])
        self.bias_ = float(state["bias"])
