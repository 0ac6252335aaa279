"""CalibratedEnsemble: several fitted ad-score models combined on the logit scale, then calibrated.

Members are any fitted models with `predict_logits(X)` and a `spec` (NetworkModel, DynamicLinear,
another ensemble): diverse base models, as the spec asks. Aggregation is
on logits (Lakshminarayanan et al., NeurIPS 2017, "Simple and Scalable Predictive Uncertainty
Estimation using Deep Ensembles", average members; on the logit scale the mean is the geometric
mean of odds, which keeps the log loss convexity argument: logloss(mean logit) <= mean logloss):

    mean          l = (1/M) sum_m l_m
    weighted      l = sum_m w_m l_m,  w normalised; `update_weights` sets w_m ~ 1 / logloss_m
                  over the most recent `window` validation rows
    median        l = median_m l_m                        (robust to one broken member)
    trimmed_mean  mean after dropping ceil(trim_fraction * M) lowest and highest l_m per row

The calibrator (`calibration_method`, temperature scaling by default) maps the aggregated logit to
a probability. The spread of member logits is the uncertainty (`predict_with_uncertainty`) and feeds
`ProbabilityIntervals` (member_logits). Saved as a bundle whose `members/<i>/` are the members'
own bundles; nothing is pickled.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from within.models.base import (
    BaseMLModel,
    BundleError,
    library_versions,
    read_arrays,
    register_model,
)
from within.models.network import SPEC_FILE
from within.models.scoring import CalibratedScoring, read_calibration, write_calibration

AGGREGATIONS = ("mean", "weighted", "median", "trimmed_mean")
MEMBERS_DIR = "members"


def aggregate_logits(members: np.ndarray, method: str, weights: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Combine member logits [N, M] into one logit per row."""
    m = members.shape[1]
    if method == "mean":
        return members.mean(axis=1)
    if method == "weighted":
        return members @ weights
    if method == "median":
        return np.median(members, axis=1)
    k = math.ceil(trim_fraction * m) if trim_fraction > 0 else 0
    if 2 * k >= m:
        k = (m - 1) // 2  # keep at least one member per row (the median for odd M)
    s = np.sort(members, axis=1)
    return s[:, k:m - k].mean(axis=1)


@register_model
class CalibratedEnsemble(CalibratedScoring, BaseMLModel):
    """Members' logits aggregated, then calibrated.

    Args:
        base_models: fitted members: any BaseMLModel with `predict_logits(X)` and a `spec`
            (NetworkModel, DynamicLinear, ...); they must share the label (`spec.label`).
        weights: one non-negative weight per member (used by aggregation 'weighted'); default equal.
        calibration_method: calibrator `calibrate()` fits: a within.calibration name (temperature,
            platt, isotonic, spline, hierarchical, geospatial) or 'none'.
        aggregation_method: mean | weighted | median | trimmed_mean.
        trim_fraction: share of members dropped at each end by trimmed_mean (at least one is kept).
    """

    def __init__(
        self,
        base_models: list[Any] | tuple[Any, ...] = (),
        weights: Any = None,
        calibration_method: str = "temperature",
        aggregation_method: str = "mean",
        trim_fraction: float = 0.2,
        model_name: str = "ad_score_ensemble",
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if aggregation_method not in AGGREGATIONS:
            raise ValueError(f"aggregation_method: {aggregation_method!r} is not one of {list(AGGREGATIONS)}")
        if not 0.0 <= float(trim_fraction) < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        _check_calibration_method(calibration_method)
        BaseMLModel.__init__(self, model_name=model_name, model_version=model_version, metadata=metadata)
        self.calibrator: Any = None
        self.intervals: Any = None
        self.calibration_method = calibration_method
        self.aggregation_method = aggregation_method
        self.trim_fraction = float(trim_fraction)
        self.base_models: list[Any] = []
        self._weights = np.zeros(0)
        for i, model in enumerate(base_models):
            self.add_model(model, 1.0 if weights is None else _weight_at(weights, i, len(base_models)))
        if weights is not None and len(weights) != len(self.base_models):
            raise ValueError(f"weights: got {len(weights)} for {len(self.base_models)} base_models; give one per model")

    # ---- members ------------------------------------------------------------------------
    def add_model(self, model: Any, weight: float = 1.0) -> CalibratedEnsemble:
        """Append a fitted member. The calibrator and intervals no longer match and are dropped."""
        if not callable(getattr(model, "predict_logits", None)) or getattr(model, "spec", None) is None:
            raise TypeError(f"add_model: {type(model).__name__} has no predict_logits(X) and spec; members are "
                            "fitted ad-score models that return logits (NetworkModel, DynamicLinear, ...)")
        if self.base_models and model.spec.label != self.spec.label:
            raise ValueError(f"add_model: the member predicts {model.spec.label!r}, the ensemble {self.spec.label!r}")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"add_model: weight must be finite and >= 0, got {weight}")
        self.base_models.append(model)
        self._weights = np.append(self._weights, weight)
        self._members_changed()
        return self

    def remove_model(self, model_idx: int) -> Any:
        """Remove and return member `model_idx`. The calibrator and intervals are dropped."""
        n = len(self.base_models)
        if not -n <= int(model_idx) < n:
            raise IndexError(f"remove_model: model_idx {model_idx} out of range for {n} members")
        model = self.base_models.pop(int(model_idx))
        self._weights = np.delete(self._weights, int(model_idx))
        self._members_changed()
        return model

    def get_model_weights(self) -> np.ndarray:
        """Normalised member weights (what aggregation 'weighted' uses)."""
        total = self._weights.sum()
        if total <= 0:
            return np.full(len(self._weights), 1.0 / max(len(self._weights), 1))
        return self._weights / total

    @property
    def spec(self) -> Any:
        """The first member's feature spec (label, weight, group fields for calibration)."""
        return self.base_models[0].spec if self.base_models else None

    @property
    def processor(self) -> Any:
        """The first member's feature processor, when it has one (network members)."""
        return getattr(self.base_models[0], "processor", None) if self.base_models else None

    def _members_changed(self) -> None:
        names: list[str] = []
        for m in self.base_models:
            names += [n for n in (m.spec.names if m.spec is not None else []) if n not in names]
        self.feature_names = names or None
        self.calibrator = None
        self.intervals = None

    def _require_fitted(self) -> None:
        if not self.base_models:
            raise RuntimeError("CalibratedEnsemble: no members; pass base_models=[...] or call add_model(model)")

    # ---- inference ----------------------------------------------------------------------
    def member_logits(self, X: Any) -> np.ndarray:
        """Logits of every member, [N, M]."""
        self._require_fitted()
        cols = [np.asarray(m.predict_logits(X), dtype=np.float64).reshape(-1) for m in self.base_models]
        return np.stack(cols, axis=1)

    def aggregate(self, members: np.ndarray) -> np.ndarray:
        return aggregate_logits(members, self.aggregation_method, self.get_model_weights(), self.trim_fraction)

    def logits_with_members(self, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
        members = self.member_logits(X)
        return self.aggregate(members), (members if members.shape[1] >= 2 else None)

    def predict_logits(self, X: Any) -> np.ndarray:
        return self.aggregate(self.member_logits(X))

    def predict_with_uncertainty(self, X: Any) -> tuple[Any, Any]:
        """(p, sd): calibrated probability and the standard deviation across members of each
        member's probability (the ensemble's calibration map applied to each member's logit)."""
        members = self.member_logits(X)
        p = self.probabilities(self.aggregate(members), X)
        if members.shape[1] < 2:
            sd = np.zeros_like(p)
        else:
            per = np.stack([self.probabilities(members[:, j], X) for j in range(members.shape[1])], axis=1)
            sd = per.std(axis=1, ddof=1)
        return (float(p[0]), float(sd[0])) if isinstance(X, dict) else (p, sd)

    # ---- fitting the ensemble's own parameters -------------------------------------------
    def _labels(self, X: Any, y: Any) -> np.ndarray:
        if y is None:
            label = self.spec.label
            if not hasattr(X, "columns") or label not in X.columns:
                raise ValueError(f"y: not given and X has no label column {label!r}; pass y")
            y = X[label]
        return np.asarray(y, dtype=np.float64)

    def calibrate(self, X_val: Any, y_val: Any = None, weight: Any = None) -> CalibratedEnsemble:
        """Fit `calibration_method` on the aggregated logits of held-out rows (not the members' training rows)."""
        from within.calibration import make_calibrator

        y = self._labels(X_val, y_val)
        if self.calibration_method == "none":
            self.calibrator = None
            return self
        logits = self.predict_logits(X_val)
        calibrator = make_calibrator(self.calibration_method)
        calibrator.fit(logits, y, groups=self.group_columns(X_val, calibrator), weight=weight)
        self.calibrator = calibrator
        self.intervals = None  # fitted on the old probabilities' logits; refit after calibrating
        return self

    def update_weights(self, X: Any, y: Any = None, window: int | None = None, weight: Any = None) -> np.ndarray:
        """Weights ~ 1 / logloss of each member over the last `window` rows of (X, y) (time-ordered
        validation data; None = all rows). Returns the normalised weights. Weights change the
        aggregated logit, so the calibrator and intervals are dropped: call `calibrate` again."""
        from within.calibration.metrics import logloss

        y = self._labels(X, y)
        n = len(y)
        start = 0 if window is None else max(0, n - int(window))
        if window is not None and int(window) < 1:
            raise ValueError(f"update_weights: window must be >= 1 rows, got {window}")
        rows = slice(start, n)
        Xw = X.iloc[rows] if hasattr(X, "iloc") else X[rows]
        members = self.member_logits(Xw)
        w = None if weight is None else np.asarray(weight, dtype=np.float64)[rows]
        losses = np.array([logloss(1.0 / (1.0 + np.exp(-members[:, j])), y[rows], weight=w)
                           for j in range(members.shape[1])])
        self._weights = 1.0 / np.maximum(losses, 1e-12)
        self.calibrator = None
        self.intervals = None
        self.metadata["member_logloss"] = losses.tolist()
        return self.get_model_weights()

    def fit(self, X: Any, y: Any = None, weight: Any = None) -> CalibratedEnsemble:
        """Fit the ensemble's own parameters on held-out rows of fitted members: weights (for
        aggregation 'weighted') and the calibrator. Members are trained elsewhere (the pipeline's
        `model=ensemble`, or each model's own fit)."""
        if self.aggregation_method == "weighted":
            self.update_weights(X, y, weight=weight)
        return self.calibrate(X, y, weight=weight)

    # ---- persistence --------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        config = {
            "n_members": len(self.base_models),
            "calibration_method": self.calibration_method,
            "aggregation_method": self.aggregation_method,
            "trim_fraction": self.trim_fraction,
            "library_versions": library_versions(),
        }
        return {"weights": self._weights.astype(np.float64)}, config

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any], members: list[Any] | None = None):
        members = list(members or [])
        if len(members) != int(config.get("n_members", 0)):
            raise BundleError(
                f"CalibratedEnsemble: {config.get('n_members')} members expected, got {len(members)}; "
                "load ensembles with CalibratedEnsemble.load(path), which reads the members/ sub-bundles"
            )
        weights = np.asarray(arrays.get("weights", np.ones(len(members))), dtype=np.float64)
        if weights.shape != (len(members),):
            raise BundleError(f"CalibratedEnsemble: weights has shape {weights.shape}, expected ({len(members)},)")
        return cls(members, weights=weights, calibration_method=config.get("calibration_method", "temperature"),
                   aggregation_method=config.get("aggregation_method", "mean"),
                   trim_fraction=float(config.get("trim_fraction", 0.2)))

    def _save_files(self, path: Path) -> None:
        write_calibration(self, path)
        if self.processor is not None:  # the input schema at the top, for servers; members keep their own
            (path / SPEC_FILE).write_text(json.dumps(self.processor.to_dict()))
        members_dir = path / MEMBERS_DIR
        if members_dir.exists():
            shutil.rmtree(members_dir)  # a smaller ensemble saved over a larger one leaves no stale members
        for i, model in enumerate(self.base_models):
            model.save(members_dir / str(i))

    @classmethod
    def _from_bundle(cls, path: Path, meta: dict[str, Any]) -> CalibratedEnsemble:
        config = meta.get("config", {})
        n = int(config.get("n_members", 0))
        missing = [i for i in range(n) if not (path / MEMBERS_DIR / str(i)).is_dir()]
        if missing:
            raise BundleError(f"{path / MEMBERS_DIR}: member sub-bundles {missing} are missing; copy the whole bundle folder")
        members = [BaseMLModel.load(path / MEMBERS_DIR / str(i)) for i in range(n)]
        model = cls._from_state(read_arrays(path), config, members=members)
        model.calibrator, model.intervals = read_calibration(path)
        return model


def _weight_at(weights: Any, i: int, n: int) -> float:
    if len(weights) != n:
        raise ValueError(f"weights: got {len(weights)} for {n} base_models; give one per model")
    return float(weights[i])


def _check_calibration_method(name: str) -> None:
    from within.calibration.base import registry

    known = sorted(set(registry()) | {"none"})
    if name not in known:
        raise ValueError(f"calibration_method: {name!r} is not one of {known}")


__all__ = ["AGGREGATIONS", "CalibratedEnsemble", "aggregate_logits"]
