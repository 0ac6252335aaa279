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
# Where each saved class lives, so `load` can import it by name. A fixed table: a file names a key
# here or nothing; it can never name a module to import. "AdScorePredictor" is the class name that
# network bundles had before the facade moved above the pipeline.
MODEL_MODULES = {
    "NetworkModel": "within.models.network",
    "AdScorePredictor": "within.models.network",
    "CalibratedEnsemble": "within.models.ensemble",
    "DynamicLinear": "within.models.linear",
    "AnomalyDetector": "within.models.anomaly",
    "AccountHealthPredictor": "within.models.account_health",
}


class BundleError(ValueError):
    """A saved model folder is missing, tampered with, or was not written by `within`."""


def register_model(cls: type[BaseMLModel] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make `cls` loadable by name from `metadata.json` (and by older `aliases`)."""
    def add(c: type[BaseMLModel]) -> type[BaseMLModel]:
        for name in (c.__name__, *aliases):
            _REGISTRY[name] = c
        return c

    return add if cls is None else add(cls)


def model_class(name: str, where: str | Path = "metadata.json") -> type[BaseMLModel]:
    """The registered class saved under `name`, importing its module from MODEL_MODULES if needed."""
    if name not in _REGISTRY and name in MODEL_MODULES:
        import importlib

        importlib.import_module(MODEL_MODULES[name])
    target = _REGISTRY.get(name)
    if target is None:
        raise BundleError(f"{where}: unknown model class {name!r}; known: {sorted(set(_REGISTRY) | set(MODEL_MODULES))}")
    return target


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

    # np.ascontiguousarray turns a 0-d array (BatchNorm's num_batches_tracked) into shape (1,): keep the shape
    contiguous = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}
    save_file(contiguous, str(Path(path) / WEIGHTS_FILE))


class BaseMLModel(abc.ABC):
    """A fitted model: `fit`, `predict`, `validate`, and `save`/`load` without pickle.

    Subclasses implement `predict`, `_get_state` (arrays + JSON config) and `_from_state`, and
    register themselves with `@register_model`; those with extra files override `_save_files` and
    `_from_bundle`. Models that learn on their own (DynamicLinear) implement `fit`; networks and
    ensembles of them are trained by the pipeline (`AdScorePredictor(...).fit`, `train.py`).
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

    def fit(self, X: Any, y: Any) -> BaseMLModel:
        """Fit on features X and labels y; return self."""
        raise TypeError(
            f"{type(self).__name__} is trained by the pipeline, not by fit(X, y): use "
            "within.AdScorePredictor(feature_config=...).fit(df) or `python train.py`"
        )

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
        self._save_files(path)
        reference = getattr(self, "reference", None)
        if reference is not None and getattr(self, "spec", None) is not None:
            from within.models.reference import write_reference

            write_reference(reference, self.spec, path)
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

    def _save_files(self, path: Path) -> None:
        """Files beside the arrays and metadata (spec.json, members/, ...); none by default."""

    @classmethod
    def load(cls, path: str | Path) -> BaseMLModel:
        """Any saved model: the class named in metadata.json (which must be `cls` or a subclass)."""
        path = Path(path)
        meta = read_metadata(path)
        name = meta["class"]
        target = model_class(name, path / METADATA_FILE)
        if not issubclass(target, cls):
            raise BundleError(f"{path}: holds a {name}, which is not a {cls.__name__}")
        model = target._from_bundle(path, meta)
        model.bundle_path = path
        if getattr(model, "spec", None) is not None:
            from within.models.reference import read_reference

            model.reference = read_reference(path, model.spec)
        model.model_name = meta.get("model_name", model.model_name)
        model.model_version = meta.get("model_version", model.model_version)
        model.feature_names = meta.get("feature_names", model.feature_names)
        model.metadata = meta.get("metadata", {}) or {}
        return model

    @classmethod
    def _from_bundle(cls, path: Path, meta: dict[str, Any]) -> BaseMLModel:
        """Rebuild from a bundle folder; subclasses with extra files read them here."""
        return cls._from_state(read_arrays(path), meta.get("config", {}))


def read_json(path: Path) -> Any:
    """A bundle's JSON file, with an error that says what is wrong."""
    if not path.is_file():
        raise BundleError(f"{path}: not found; is this a bundle folder written by train.py?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err


def library_versions() -> dict[str, str]:
    """Versions of the libraries a bundle depends on (recorded in its metadata)."""
    import importlib.metadata as md

    out = {}
    for name in ("within", "torch", "lightning", "numpy", "scikit-learn", "opacus", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
