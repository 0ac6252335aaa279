"""AdScorePredictor: a trained network + its feature processor + calibrator, saved as one bundle.

Bundle layout (no pickle anywhere):
  model.safetensors   network weights
  spec.json           FeatureSpec + fitted FeatureProcessor state
  calibration.json    calibrator (and interval) parameters, or null
  metadata.json       class, network class + kwargs, versions, config, metrics, privacy report
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from within.features.processor import FeatureProcessor
from within.models.base import (
    BaseMLModel,
    BundleError,
    read_arrays,
    read_metadata,
    register_model,
)

SPEC_FILE = "spec.json"
# model_type -> the train.py override that selects it
FIT_MODEL_TYPES = {"nn": "model=nn", "ensemble": "model=ensemble"}
CALIBRATION_FILE = "calibration.json"


def _net_classes() -> dict[str, type[nn.Module]]:
    """Networks a bundle may name. A name outside this table is refused, never imported."""
    from within.nn.predictor import AdPredictorNN

    return {"AdPredictorNN": AdPredictorNN}


def build_net(net_class: str, net_kwargs: dict[str, Any]) -> nn.Module:
    classes = _net_classes()
    if net_class not in classes:
        raise BundleError(f"unknown network class {net_class!r}; known: {sorted(classes)}")
    return classes[net_class](**net_kwargs)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("within", "torch", "lightning", "numpy", "scikit-learn", "opacus", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


@register_model
class AdScorePredictor(BaseMLModel):
    """Calibrated ad-score model. `predict` takes a DataFrame, one record dict, or a list of dicts."""

    def __init__(
        self,
        processor: FeatureProcessor | None = None,
        net: nn.Module | None = None,
        net_class: str = "AdPredictorNN",
        net_kwargs: dict[str, Any] | None = None,
        calibrator: Any = None,
        intervals: Any = None,
        model_name: str = "ad_score",
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
        batch_size: int = 8192,
        feature_config: dict[str, list[str]] | None = None,
        model_type: str = "nn",
        calibration: bool = True,
        explainable: bool = False,
        train_overrides: list[str] | None = None,
    ) -> None:
        names = processor.spec.names if processor is not None else None
        super().__init__(model_name=model_name, feature_names=names, model_version=model_version, metadata=metadata)
        self.processor = processor
        self.net = net.eval() if net is not None else None
        self.net_class = net_class
        self.net_kwargs = dict(net_kwargs or {})
        self.calibrator = calibrator
        self.intervals = intervals
        self.batch_size = batch_size
        # how fit() trains (the seed's constructor arguments)
        if model_type not in FIT_MODEL_TYPES:
            raise ValueError(f"model_type: {model_type!r} is not one of {sorted(FIT_MODEL_TYPES)}")
        self.feature_config = feature_config
        self.model_type = model_type
        self.calibration = calibration
        self.explainable = explainable
        self.train_overrides = list(train_overrides or [])

    # ---- inference ----------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.net is None or self.processor is None:
            raise RuntimeError("AdScorePredictor: not trained; call fit(df) or AdScorePredictor.load(bundle)")

    @torch.no_grad()
    def predict_logits(self, X: Any) -> np.ndarray:
        self._require_fitted()
        arrays = self.processor.transform(X)
        n = len(arrays["mask_tabular"])
        self.net.eval()
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            batch = {k: torch.as_tensor(v[sl]) for k, v in arrays.items()}
            out[sl] = self.net(batch).float().numpy()
        return out

    def group_columns(self, X: Any) -> dict[str, np.ndarray] | None:
        """Raw values of the columns a calibrator keys on (group fields and any it declares)."""
        df = self.processor.spec.records_to_frame(X)
        wanted = [f.name for f in self.processor.spec.groups]
        wanted += [c for c in getattr(self.calibrator, "required_columns", ()) if c not in wanted]
        cols = {c: df[c].to_numpy() for c in wanted if c in df.columns}
        return cols or None

    def logits_with_members(self, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits [N], per-member logits [N, M] or None); an ensemble returns its members' too."""
        return self.predict_logits(X), None

    def probabilities(self, logits: np.ndarray, X: Any) -> np.ndarray:
        """Calibrated probabilities for logits of the rows of X (X supplies the calibrator's group columns)."""
        if self.calibrator is None:
            return 1.0 / (1.0 + np.exp(-logits))
        return np.asarray(self.calibrator.transform(logits, groups=self.group_columns(X)), dtype=np.float64)

    def predict(self, X: Any) -> np.ndarray | float:
        p = self.probabilities(self.predict_logits(X), X)
        return float(p[0]) if isinstance(X, dict) else p

    def predict_with_intervals(self, X: Any, alpha: float = 0.1) -> tuple[Any, Any, Any]:
        """(score, lower, upper): `predict(X)` and a central 1 - alpha interval for the TRUE click
        probability (ProbabilityIntervals fitted on the calib split), widened to contain the score."""
        if self.intervals is None:
            raise RuntimeError(
                "predict_with_intervals: this model has no intervals; train with the post-fit step "
                "`intervals` (postfit: [calibrate, intervals, ..., export])"
            )
        logits, members = self.logits_with_members(X)
        p = self.probabilities(logits, X)
        _, lo, hi = self.intervals.interval(logits, alpha, member_logits=members if self.intervals.uses_members_ else None)
        lo, hi = np.minimum(lo, p), np.maximum(hi, p)
        if isinstance(X, dict):
            return float(p[0]), float(lo[0]), float(hi[0])
        return p, lo, hi

    def fit(self, X: Any, y: Any = None, label: str = "clicked", output_dir: str | Path | None = None) -> AdScorePredictor:
        """Train through the same pipeline as `train.py` on a DataFrame (features + label column, or y)."""
        from within.pipeline.api import fit_predictor  # the facade sits over the pipeline by design

        overrides = [FIT_MODEL_TYPES[self.model_type]] + (["calibrator=none"] if not self.calibration else [])
        fitted = fit_predictor(
            X, y,
            processor_spec=self.processor.spec if self.processor else None,
            feature_config=self.feature_config,
            label=label,
            overrides=overrides + self.train_overrides,
            output_dir=output_dir,
        )
        if type(fitted) is not AdScorePredictor:
            # model_type="ensemble" yields a CalibratedEnsemble (a subclass): become it, keeping this
            # object's constructor settings
            keep = {k: getattr(self, k) for k in ("feature_config", "model_type", "calibration", "explainable",
                                                  "train_overrides")}
            self.__class__ = type(fitted)
            self.__dict__.update({**fitted.__dict__, **keep})
            return self
        for key in ("processor", "net", "net_class", "net_kwargs", "calibrator", "intervals", "feature_names", "metadata"):
            setattr(self, key, getattr(fitted, key))
        return self

    # ---- persistence --------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.net.state_dict().items()}
        return arrays, {"net_class": self.net_class, "net_kwargs": self.net_kwargs, "library_versions": library_versions()}

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> AdScorePredictor:
        net = build_net(config["net_class"], config["net_kwargs"])
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        # keep integer buffers (e.g. BatchNorm counters) in their own dtype
        ref = net.state_dict()
        state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BundleError(f"model.safetensors does not match {config['net_class']}: {err}") from err
        return cls(net=net, net_class=config["net_class"], net_kwargs=config["net_kwargs"])

    def save(self, path: str | Path) -> Path:
        path = super().save(path)
        (path / SPEC_FILE).write_text(json.dumps(self.processor.to_dict()))
        calib = {
            "calibrator": self.calibrator.to_dict() if self.calibrator is not None else None,
            "intervals": self.intervals.to_dict() if self.intervals is not None else None,
        }
        (path / CALIBRATION_FILE).write_text(json.dumps(calib, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AdScorePredictor:
        path = Path(path)
        meta = read_metadata(path)
        sub = _subclass_for(meta["class"], cls)
        if sub is not None:
            return sub.load(path)  # e.g. a CalibratedEnsemble bundle, which holds member sub-bundles
        if meta["class"] != cls.__name__:
            raise BundleError(f"{path}: holds a {meta['class']}, not an {cls.__name__}")
        model = cls._from_state(read_arrays(path), meta.get("config", {}))
        model.model_name = meta.get("model_name", model.model_name)
        model.model_version = meta.get("model_version", model.model_version)
        model.feature_names = meta.get("feature_names")
        model.metadata = meta.get("metadata", {}) or {}
        model.processor = FeatureProcessor.from_dict(_read_json(path / SPEC_FILE))
        calib = _read_json(path / CALIBRATION_FILE) if (path / CALIBRATION_FILE).exists() else {}
        from within.calibration import calibrator_from_dict
        from within.calibration.intervals import ProbabilityIntervals

        model.calibrator = calibrator_from_dict(calib["calibrator"]) if calib.get("calibrator") else None
        model.intervals = ProbabilityIntervals.from_dict(calib["intervals"]) if calib.get("intervals") else None
        return model


def _subclass_for(name: str, cls: type) -> type | None:
    """The registered strict subclass of `cls` called `name`, or None (never imports the name)."""
    import within.models.ensemble  # noqa: F401  (registers CalibratedEnsemble)
    from within.models.base import _REGISTRY

    target = _REGISTRY.get(name)
    return target if target is not None and target is not cls and issubclass(target, cls) else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise BundleError(f"{path}: not found; is this a bundle folder written by train.py?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
