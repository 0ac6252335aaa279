"""Name -> class for the global (group-free) calibrators that group-aware calibrators build on."""
from __future__ import annotations

from within.calibration.base import Calibrator
from within.calibration.isotonic import IsotonicCalibrator
from within.calibration.platt import PlattScaling
from within.calibration.spline import SplineCalibrator
from within.calibration.temperature import TemperatureScaling

BASE_METHODS: dict[str, type[Calibrator]] = {
    "temperature": TemperatureScaling,
    "platt": PlattScaling,
    "isotonic": IsotonicCalibrator,
    "spline": SplineCalibrator,
}


def make_base(method: str, who: str) -> Calibrator:
    if method not in BASE_METHODS:
        raise ValueError(f"{who}: calibration_method must be one of {sorted(BASE_METHODS)}, got {method!r}")
    return BASE_METHODS[method]()
