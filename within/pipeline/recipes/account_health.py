"""model=account_health: AccountHealthPredictor (calibrated churn risk, 0-100 health, SHAP factors)
on the run's data, e.g. `python train.py model=account_health data=telco`.

The feature spec's numeric and categorical fields are the health indicators, its group field of
level `account` the account id. The predictor calibrates itself on a held-out share of the rows it
fits (the train and val splits together), so the pipeline's calibrate step skips it; the runner's
test report scores it on the test split like every other model kind.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig

from within.calibration.metrics import auc, logloss
from within.pipeline.recipe import FitResult, TrainRun


class AccountHealthRecipe:
    """Recipe for model=account_health. `predictor`: the AccountHealthPredictor settings, without
    `indicators` (they come from the feature spec)."""

    def __init__(self, predictor: DictConfig) -> None:
        self.predictor = predictor

    def fit(self, run: TrainRun) -> FitResult:
        frames = run.data().split()
        spec = run.data().spec
        indicators = [f.name for f in spec.of_type("numeric", "categorical")]
        accounts = [f.name for f in spec.groups if f.level == "account"]
        extra: dict[str, Any] = {"id_column": accounts[0]} if accounts else {}
        model = instantiate(self.predictor, indicators=indicators,
                            categorical=[f.name for f in spec.of_type("categorical")], **extra, _convert_="all")
        rows = pd.concat([frames["train"], frames.get("val", frames["train"].iloc[:0])], ignore_index=True)
        model.fit(rows, rows[spec.label].to_numpy())
        metrics: dict[str, float] = {}
        if len(frames.get("val", ())):  # val rows were fitted on too; the honest figures are test's
            p = model.predict(frames["val"])
            y = frames["val"][spec.label].to_numpy(dtype=float)
            metrics = {"val/auc": auc(p, y), "val/logloss": logloss(p, y)}
        summary = (f"AccountHealthPredictor ({model.model_type}), {len(indicators)} indicators, fitted on "
                   f"{len(rows)} rows (train + val; {model.calibration} calibration on a held-out share).")
        return FitResult(model=model, frames=frames, metrics=metrics, spec=spec, summary={"Model": summary})
