"""CalibratedScoring: logits -> calibrated probabilities and intervals, for every ad-score model.

NetworkModel, CalibratedEnsemble and DynamicLinear each produce logits their own way
(`predict_logits(X)`, which each class defines); this mixin turns them into what users read, the same way for all three, so the
pipeline's post-fit steps and reports need not know which model they hold. A class using it has
`spec` (FeatureSpec), `calibrator` and `intervals` (None when not fitted).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_FILE = "calibration.json"
log = logging.getLogger(__name__)


def is_records(X: Any) -> bool:
    """One record dict or a list of them: what an ad server sends, and what the fast path takes."""
    return isinstance(X, dict) or (isinstance(X, list) and bool(X) and all(isinstance(r, dict) for r in X))


class CalibratedScoring:
    spec: Any
    calibrator: Any
    intervals: Any
    bundle_path: Path | None = None  # set by BaseMLModel.load: where the fast path's ONNX graph lives
    reference: Any = None  # training rows kept for explanations (bundle/reference.parquet)
    _fast: tuple[Any, Any] | None = None

    def record_scorer(self) -> Any:
        """The fast record path: records straight to arrays (RecordEncoder) and through the bundle's
        ONNX graph in ONNX Runtime (OnnxScorer), calibration applied to its logits. Only while the
        model is as it was loaded (same calibrator, intervals and networks; code that changes weights
        in place sets `bundle_path = None`); else None, and scoring takes the torch path."""
        if self.bundle_path is None:
            return None
        key = (id(self.calibrator), id(self.intervals),
               *(id(getattr(m, "net", None)) for m in getattr(self, "base_models", None) or [self]))
        if self._fast is None or self._fast[0] != key:
            from within.models.onnx_scorer import OnnxScorer, find_graph

            scorer = None
            if getattr(self, "processor", None) is not None and find_graph(self.bundle_path) is not None:
                try:
                    scorer = OnnxScorer.from_model(self, bundle=self.bundle_path)
                except (TypeError, ValueError, OSError) as err:
                    log.info("no fast record path for %s (%s); scoring with torch", self.bundle_path, err)
            if scorer is not None:  # trust the graph only once it agrees with the weights it sits beside
                from within.features.records import RecordEncoder
                from within.models.onnx_scorer import CHECK_ATOL, max_abs_diff

                diff = max_abs_diff(scorer, self, RecordEncoder(self.processor).example_records(16))
                if not diff <= CHECK_ATOL:
                    log.warning("%s: the ONNX graph differs from the model by %.2e > %.0e; scoring with torch "
                                "(re-export with the post-fit step `export`)", self.bundle_path, diff, CHECK_ATOL)
                    scorer = None
            self._fast = (key, scorer)
        return self._fast[1]

    def logits_with_members(self, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits [N], per-member logits [N, M] or None); an ensemble returns its members' too."""
        return self.predict_logits(X), None

    def group_columns(self, X: Any, calibrator: Any = None) -> dict[str, np.ndarray] | None:
        """Raw values of the columns a calibrator keys on: the spec's group fields and any the
        calibrator (this model's, or the one given) declares in `required_columns`."""
        calibrator = self.calibrator if calibrator is None else calibrator
        df = self.spec.records_to_frame(X)
        wanted = [f.name for f in self.spec.groups]
        wanted += [c for c in getattr(calibrator, "required_columns", ()) or () if c not in wanted]
        cols = {c: df[c].to_numpy() for c in wanted if c in df.columns}
        return cols or None

    def probabilities(self, logits: np.ndarray, X: Any) -> np.ndarray:
        """Calibrated probabilities for logits of the rows of X (X supplies the calibrator's group columns)."""
        if self.calibrator is None:
            return 1.0 / (1.0 + np.exp(-logits))
        return np.asarray(self.calibrator.transform(logits, groups=self.group_columns(X)), dtype=np.float64)

    def predict(self, X: Any) -> np.ndarray | float:
        """Calibrated click probabilities: a float for one record dict, else an array of len(X).
        Records (a dict, a list of dicts) take the fast path when the bundle has an ONNX graph."""
        fast = self.record_scorer() if is_records(X) else None
        if fast is not None:
            return fast.predict(X)
        p = self.probabilities(self.predict_logits(X), X)
        return float(p[0]) if isinstance(X, dict) else p

    def predict_with_intervals(self, X: Any, alpha: float = 0.1) -> tuple[Any, Any, Any]:
        """(score, lower, upper): `predict(X)` and a central 1 - alpha interval for the TRUE click
        probability (ProbabilityIntervals), widened to contain the score."""
        if self.intervals is None:
            raise RuntimeError(
                f"predict_with_intervals: this {type(self).__name__} has no intervals; train with the post-fit "
                "step `intervals` (postfit: [calibrate, intervals, ..., export])"
            )
        fast = self.record_scorer() if is_records(X) else None
        if fast is not None and (fast.aggregate is not None or not self.intervals.uses_members_):
            return fast.predict_with_intervals(X, alpha=alpha)
        logits, members = self.logits_with_members(X)
        p = self.probabilities(logits, X)
        _, lo, hi = self.intervals.interval(logits, alpha, member_logits=members if self.intervals.uses_members_ else None)
        lo, hi = np.minimum(lo, p), np.maximum(hi, p)
        if isinstance(X, dict):
            return float(p[0]), float(lo[0]), float(hi[0])
        return p, lo, hi


def calibration_to_dict(model: Any) -> dict[str, Any]:
    """The calibrator's and the intervals' parameters (null when absent)."""
    return {
        "calibrator": model.calibrator.to_dict() if model.calibrator is not None else None,
        "intervals": model.intervals.to_dict() if model.intervals is not None else None,
    }


def write_calibration(model: Any, bundle: Path) -> None:
    (bundle / CALIBRATION_FILE).write_text(json.dumps(calibration_to_dict(model), indent=2))


def read_calibration(bundle: Path) -> tuple[Any, Any]:
    """(calibrator, intervals) of a bundle; (None, None) when it has no calibration.json."""
    from within.models.base import read_json

    path = bundle / CALIBRATION_FILE
    return calibration_from_dict(read_json(path) if path.is_file() else {})


def calibration_from_dict(calib: dict[str, Any]) -> tuple[Any, Any]:
    """(calibrator, intervals) from calibration.json's content."""
    from within.calibration import calibrator_from_dict
    from within.calibration.intervals import ProbabilityIntervals

    calibrator = calibrator_from_dict(calib["calibrator"]) if calib.get("calibrator") else None
    intervals = ProbabilityIntervals.from_dict(calib["intervals"]) if calib.get("intervals") else None
    return calibrator, intervals
