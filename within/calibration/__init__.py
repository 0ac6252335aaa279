"""Post-hoc calibration of logits into click probabilities, calibration metrics, and intervals.

Every calibrator: `fit(scores, y, groups=None, weight=None) -> self`, `transform(scores, groups=None)
-> probabilities`, `to_dict()`; `calibrator_from_dict` rebuilds one through a registry of known
classes (no name in the dict is ever imported).
"""
from __future__ import annotations

from typing import Any

from within.calibration.base import Calibrator, calibrator_from_dict, registry
from within.calibration.geospatial import GeospatialCalibrator
from within.calibration.hierarchical import HierarchicalCalibrator
from within.calibration.identity import IdentityCalibrator
from within.calibration.intervals import ProbabilityIntervals, SplitConformalRegressor, coverage, mean_width
from within.calibration.isotonic import IsotonicCalibrator
from within.calibration.metrics import binary_report
from within.calibration.platt import PlattScaling
from within.calibration.spline import SplineCalibrator
from within.calibration.temperature import TemperatureScaling


def make_calibrator(name: str, **kw: Any) -> Calibrator:
    """Build a calibrator by registry name: none, temperature, platt, isotonic, spline,
    hierarchical, geospatial."""
    known = registry()
    if name not in known:
        raise ValueError(f"make_calibrator: unknown calibrator {name!r}; choose one of {sorted(known)}")
    return known[name](**kw)


__all__ = [
    "Calibrator",
    "GeospatialCalibrator",
    "HierarchicalCalibrator",
    "IdentityCalibrator",
    "IsotonicCalibrator",
    "PlattScaling",
    "ProbabilityIntervals",
    "SplineCalibrator",
    "SplitConformalRegressor",
    "TemperatureScaling",
    "binary_report",
    "calibrator_from_dict",
    "coverage",
    "make_calibrator",
    "mean_width",
]
