"""AdScorePredictor: the user-facing ad-score model (the spec's component), over the training pipeline.

It trains through the same pipeline as `train.py` (`fit` composes conf/train.yaml with the overrides
its settings imply and runs it on the caller's DataFrame), and wraps the fitted inference object the
run saved: a NetworkModel (`model_type="nn"`), a CalibratedEnsemble ("ensemble") or a DynamicLinear
("linear"). Loading a bundle wraps whatever model the bundle holds. This module sits above
within/pipeline; nothing below it imports it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from within.features.spec import FeatureError, FeatureSpec
from within.models.base import BaseMLModel, BundleError

# model_type -> the train.py override that selects its recipe
MODEL_TYPES = {"nn": "model=nn", "ensemble": "model=ensemble", "linear": "model=linear"}
SETTINGS_KEY = "predictor"  # where the facade's own settings live in the bundle metadata
DEFAULT_POSTFIT = ("calibrate", "intervals", "ensemble", "quantize", "export")


class AdScorePredictor(BaseMLModel):
    """Predict an ad's click (or conversion) probability from its text, image and tabular features.

    Args:
        feature_config: which DataFrame columns are features, e.g. {"text_features": [...],
            "image_features": [...], "numerical_features": [...], "categorical_features": [...],
            "group_features": [...]}; or pass `spec` (a FeatureSpec) for full control.
        model_type: 'nn' (AdPredictorNN), 'ensemble' (CalibratedEnsemble of networks) or 'linear'
            (DynamicLinear, online FTRL).
        calibration: fit the configured calibrator (temperature scaling by default) on held-out rows.
        explainable: keep what explanations need (a reference sample of training rows in the bundle).
        uncertainty: fit intervals for the true click probability (`predict_with_intervals`).
        train_overrides: extra train.py overrides, e.g. ["trainer.max_epochs=3", "text_model=minilm"].
        model: an already fitted inference object to wrap (what `load` does).
    """

    def __init__(
        self,
        feature_config: dict[str, list[str]] | None = None,
        model_type: str = "nn",
        calibration: bool = True,
        explainable: bool = True,
        uncertainty: bool = True,
        train_overrides: Sequence[str] = (),
        spec: FeatureSpec | None = None,
        model: BaseMLModel | None = None,
        model_name: str = "ad_score",
        model_version: str = "0.1.0",
    ) -> None:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"AdScorePredictor.model_type: {model_type!r} is not one of {sorted(MODEL_TYPES)}")
        self.feature_config = dict(feature_config) if feature_config else None
        self.model_type = model_type
        self.calibration = bool(calibration)
        self.explainable = bool(explainable)
        self.uncertainty = bool(uncertainty)
        self.train_overrides = list(train_overrides or [])
        self._spec = spec
        self.model: BaseMLModel | None = None
        super().__init__(model_name=model_name, feature_names=None, model_version=model_version)
        self.model = model
        self.run_dir: Path | None = None

    # ---- what the wrapped model holds ---------------------------------------------------------
    def _fitted(self) -> Any:
        if self.model is None:
            raise RuntimeError("AdScorePredictor: not trained; call fit(df) or AdScorePredictor.load(bundle)")
        return self.model

    @property
    def spec(self) -> FeatureSpec | None:
        return self.model.spec if self.model is not None else self._spec

    @property
    def processor(self) -> Any:
        return getattr(self.model, "processor", None)

    @property
    def net(self) -> Any:
        return getattr(self.model, "net", None)

    @property
    def calibrator(self) -> Any:
        return getattr(self.model, "calibrator", None)

    @property
    def intervals(self) -> Any:
        return getattr(self.model, "intervals", None)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.model.metadata if self.model is not None else self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, Any]) -> None:
        if self.model is not None:
            self.model.metadata = value
        else:
            self._metadata = dict(value)

    @property
    def feature_names(self) -> list[str] | None:
        return self.model.feature_names if self.model is not None else None

    @feature_names.setter
    def feature_names(self, value: Any) -> None:  # BaseMLModel sets it; the wrapped model owns it
        return

    # ---- training -------------------------------------------------------------------------------
    def overrides(self) -> list[str]:
        """The train.py overrides these settings imply, then `train_overrides`."""
        out = [MODEL_TYPES[self.model_type]]
        if not self.calibration:
            out.append("calibrator=none")
        if not self.uncertainty:
            out.append("postfit=[" + ",".join(s for s in DEFAULT_POSTFIT if s != "intervals") + "]")
        if not self.explainable:
            out.append("explain.reference_rows=0")
        return out + self.train_overrides

    def fit(self, X: Any, y: Any = None, label: str = "clicked", output_dir: str | Path | None = None,
            overrides: Sequence[str] = ()) -> AdScorePredictor:
        """Train through the same pipeline as `train.py` on a DataFrame (features + label column, or y);
        `overrides`: train.py overrides for this fit only (after `train_overrides`)."""
        from within.pipeline.fit import fit_frame, spec_from_feature_config, training_frame

        df = training_frame(X, y, label)
        spec = self._spec
        if spec is None:
            if self.feature_config is None:
                raise FeatureError("fit: pass feature_config={...} (or spec=FeatureSpec) to say which columns are features")
            spec = spec_from_feature_config(self.feature_config, df, label)
        run_dir = fit_frame(df, spec, [*self.overrides(), *overrides], output_dir)
        self.model = BaseMLModel.load(run_dir / "bundle")
        self.model.metadata[SETTINGS_KEY] = self.settings()
        self.run_dir = run_dir
        return self

    def update(self, new_data: Any, y: Any = None, label: str | None = None, output_dir: str | Path | None = None,
               overrides: Sequence[str] = ()) -> AdScorePredictor:
        """Update the model with new labelled rows, through the pipeline that trained it: a warm-start
        fine-tune for networks and ensembles, FTRL's `fit_incremental` for linear models. The new bundle
        records every version with the rows it saw (`metadata["versions"]`)."""
        from within.pipeline.fit import training_frame
        from within.pipeline.update import update_model

        model = self._fitted()
        df = training_frame(new_data, y, label or model.spec.label)
        run_dir = update_model(model, df, overrides, output_dir)
        self.model = BaseMLModel.load(run_dir / "bundle")
        self.model.metadata[SETTINGS_KEY] = self.settings()
        self.run_dir = run_dir
        return self

    @property
    def versions(self) -> list[dict[str, Any]]:
        """Every version of the model: the fit, then each update, with the rows it trained on."""
        return list(self.metadata.get("versions", []))

    def settings(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "calibration": self.calibration, "explainable": self.explainable,
                "uncertainty": self.uncertainty, "feature_config": self.feature_config,
                "train_overrides": self.train_overrides}

    # ---- inference ------------------------------------------------------------------------------
    def predict(self, ad_features: Any) -> np.ndarray | float:
        """Calibrated probability: a float for one ad (a dict), an array for a DataFrame or a list of dicts."""
        return self._fitted().predict(ad_features)

    def predict_logits(self, ad_features: Any) -> np.ndarray:
        return self._fitted().predict_logits(ad_features)

    def predict_with_intervals(self, ad_features: Any, alpha: float = 0.1) -> tuple[Any, Any, Any]:
        """(score, lower, upper): the score and a central 1 - alpha interval for the ad's TRUE click probability."""
        model = self._fitted()
        if getattr(model, "intervals", None) is None:
            fix = ("train with uncertainty=True (the default), which runs the post-fit step `intervals`"
                   if not self.uncertainty else "retrain with the post-fit step `intervals` in postfit")
            raise RuntimeError(f"predict_with_intervals: this model has no intervals; {fix}")
        return model.predict_with_intervals(ad_features, alpha=alpha)

    # ---- explanations ---------------------------------------------------------------------------
    def _reference(self) -> Any:
        model = self._fitted()
        if not self.explainable:
            raise RuntimeError("explain: this predictor was built with explainable=False; train with "
                               "explainable=True (the default) to keep the reference sample explanations need")
        if getattr(model, "reference", None) is None:
            raise RuntimeError("explain: the bundle holds no reference sample of training rows; retrain with "
                               "explain.reference_rows > 0 (the default is 256)")
        return model.reference

    def explain(self, ad_features: Any, **options: Any) -> dict[str, Any]:
        """SHAP attributions of the score's logit to each raw feature, with a per-modality summary.
        One ad (a dict) gives its explanation; a DataFrame or a list of dicts gives one per ad.
        Options go to within.explain.explain (method, nsamples, background_size, seed)."""
        from within.explain import explain

        result = explain(self._fitted(), ad_features, self._reference(), **options)
        if isinstance(ad_features, dict):
            return {**result.row(0), "scale": result.scale, "method": result.method}
        return result.to_dict()

    def get_feature_importance(self, **options: Any) -> dict[str, Any]:
        """Global importance: the mean |attribution| of each feature over the bundle's reference sample."""
        from within.explain import feature_importance

        return feature_importance(self._fitted(), self._reference(), **options).to_dict()

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        model = self._fitted()
        model.metadata[SETTINGS_KEY] = self.settings()
        return model.save(path)

    @classmethod
    def load(cls, path: str | Path) -> AdScorePredictor:
        """Any bundle written by train.py or fit (a network, an ensemble or a linear model)."""
        model = BaseMLModel.load(path)
        if getattr(model, "spec", None) is None or not callable(getattr(model, "predict_logits", None)):
            raise BundleError(f"{path}: holds a {type(model).__name__}, which is not an ad-score model")
        saved = dict(model.metadata.get(SETTINGS_KEY) or {})
        kinds = {"NetworkModel": "nn", "CalibratedEnsemble": "ensemble", "DynamicLinear": "linear"}
        predictor = cls(
            feature_config=saved.get("feature_config"),
            model_type=saved.get("model_type", kinds.get(type(model).__name__, "nn")),
            calibration=saved.get("calibration", model.calibrator is not None),
            explainable=saved.get("explainable", True),
            uncertainty=saved.get("uncertainty", getattr(model, "intervals", None) is not None),
            train_overrides=saved.get("train_overrides", ()),
            model=model,
        )
        predictor.model_name, predictor.model_version = model.model_name, model.model_version
        return predictor

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self._fitted()._get_state()

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> AdScorePredictor:
        raise TypeError("AdScorePredictor wraps a saved model: load it with AdScorePredictor.load(bundle_path)")


__all__ = ["MODEL_TYPES", "AdScorePredictor"]
