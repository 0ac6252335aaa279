"""BaseMLModel: the common face of every fitted model in `within`, and its pickle-free persistence.

A saved model is a folder with `model.safetensors` (arrays) and `metadata.json` (class name,
config, versions). Loading dispatches on the class name through a registry of known classes,
so a file can never name code to run.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"

_REGISTRY: dict[str, type[BaseMLModel]] = {}


class BundleError(ValueError):
    """A saved model folder is missing, tampered with, or was not written by `within`."""


def register_model(cls: type[BaseMLModel]) -> type[BaseMLModel]:
    """Class decorator: make `cls` loadable by name from `metadata.json`."""
    _REGISTRY[cls.__name__] = cls
    return cls


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise BundleError(f"{meta_file}: not found; expected a folder written by BaseMLModel.save")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{meta_file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or "class" not in meta or "format_version" not in meta:
        raise BundleError(f"{meta_file}: missing 'class' or 'format_version'; not a within model")
    if meta["format_version"] > FORMAT_VERSION:
        raise BundleError(
            f"{meta_file}: format_version {meta['format_version']} is newer than this within "
            f"({FORMAT_VERSION}); upgrade within to load it"
        )
    return meta


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{weights}: not found")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{weights}: not a valid safetensors file ({err})") from err


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(contiguous, str(Path(path) / WEIGHTS_FILE))


class BaseMLModel(abc.ABC):
    """A fitted model: `fit`, `predict`, `validate`, and `save`/`load` without pickle.

    Subclasses implement `fit`, `predict`, `_get_state` (arrays + JSON config) and
    `_from_state`, and register themselves with `@register_model`.
    """

    task: ClassVar[str] = "binary"

    def __init__(
        self,
        model_name: str = "model",
        feature_names: list[str] | None = None,
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.model_version = model_version
        self.metadata: dict[str, Any] = dict(metadata or {})

    @abc.abstractmethod
    def fit(self, X: Any, y: Any) -> BaseMLModel:
        """Fit on features X and labels y; return self."""

    @abc.abstractmethod
    def predict(self, X: Any) -> np.ndarray:
        """Probabilities (binary models) as a float64 array of len(X)."""

    @abc.abstractmethod
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays for safetensors, JSON-serialisable config) that rebuild this model."""

    @classmethod
    @abc.abstractmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> BaseMLModel:
        """Inverse of `_get_state`."""

    def validate(self, X: Any, y: Any, weight: Any = None) -> dict[str, float]:
        """Score on labelled data: auc, logloss, brier, ece, calib_ratio."""
        from within.calibration.metrics import binary_report

        return binary_report(self.predict(X), np.asarray(y, dtype=np.float64), weight=weight)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays, config = self._get_state()
        write_arrays(path, arrays)
        meta = {
            "class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "feature_names": self.feature_names,
            "metadata": self.metadata,
            "config": config,
        }
        (path / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BaseMLModel:
        meta = read_metadata(path)
        name = meta["class"]
        target = _REGISTRY.get(name)
        if target is None:
            raise BundleError(
                f"{Path(path) / METADATA_FILE}: unknown model class {name!r}; "
                f"known: {sorted(_REGISTRY)}"
            )
        if not issubclass(target, cls):
            raise BundleError(f"{path}: holds a {name}, which is not a {cls.__name__}")
        model = target._from_state(read_arrays(path), meta.get("config", {}))
        model.model_name = meta.get("model_name", model.model_name)
        model.model_version = meta.get("model_version", model.model_version)
        model.feature_names = meta.get("feature_names", model.feature_names)
        model.metadata = meta.get("metadata", {}) or {}
        return model


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
