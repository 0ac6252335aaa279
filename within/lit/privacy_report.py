"""The privacy report of a DP run: report/privacy.{json,md} and the bundle's privacy metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from within.privacy.engine import PrivacyConfigError
from within.privacy.validator import DPTrainingValidator


def privacy_report(module: L.LightningModule, trainer: L.Trainer, report_dir: str | Path) -> dict[str, Any]:
    """Write report/privacy.{json,md} and return the dict that goes into the bundle metadata."""
    validator = next((c for c in trainer.callbacks if isinstance(c, DPTrainingValidator)), None)
    if validator is None:
        raise PrivacyConfigError("privacy=dp: no DPTrainingValidator among the trainer callbacks")
    if validator._private is None:
        validator._private = getattr(module, "privacy", None)
    return validator.generate_privacy_report(report_dir)
