"""within: ad-performance prediction on PyTorch Lightning + Hydra."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported on first use so `import within` stays light (no torch until needed).
_LAZY = {
    "AdScorePredictor": "within.predictor",
    "AnomalyDetector": "within.models.anomaly",
    "AccountHealthPredictor": "within.models.account_health",
    "PerformanceMonitor": "within.monitoring.monitor",
    "CalibratedEnsemble": "within.models.ensemble",
    "DynamicLinear": "within.models.linear",
    "NetworkModel": "within.models.network",
    "BaseMLModel": "within.models.base",
    "FeatureSpec": "within.features.spec",
    "FeatureProcessor": "within.features.processor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'within' has no attribute {name!r}")


__all__ = sorted(_LAZY)
