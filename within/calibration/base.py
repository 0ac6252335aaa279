"""Shared machinery for calibrators: input checks, the registry, and binomial helpers.

Every calibrator maps LOGITS to probabilities with `fit(scores, y, groups=None, weight=None)`
and `transform(scores, groups=None)`, and serialises to a JSON-able dict (`to_dict`) that
`calibrator_from_dict` rebuilds through a registry of known classes, so a file never names
code to run.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit, log_expit

_REGISTRY: dict[str, type[Calibrator]] = {}
_P_CLIP = 1e-7


def register(name: str):
    """Class decorator: make a calibrator rebuildable from `{"type": name, ...}`."""

    def deco(cls: type[Calibrator]) -> type[Calibrator]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"calibrator type {name!r} is registered twice")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registry() -> dict[str, type[Calibrator]]:
    return dict(_REGISTRY)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _P_CLIP, 1.0 - _P_CLIP)
    return np.log(p) - np.log1p(-p)


def check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of logits, got shape {s.shape}; flatten it first")
    if not np.all(np.isfinite(s)):
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name}: non-finite logit at row {bad}; drop or fill NaN/inf before calibrating")
    return s


def check_labels(y: Any, n: int, weight: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (clicks, impressions) as float64 arrays of length n.

    Without `weight`, y must be 0/1 and every row is one impression. With `weight`
    (impressions of an aggregated row), y is the click count, 0 <= y <= weight.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"y: expected shape ({n},) to match scores, got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y: contains NaN/inf; labels must be finite 0/1 (or click counts with weight=)")
    if weight is None:
        if np.any((y != 0) & (y != 1)):
            raise ValueError("y: labels must be 0/1; pass weight=impressions if y holds click counts")
        return y, np.ones(n)
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weight: expected shape ({n},) to match scores, got {w.shape}")
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weight: impressions must be finite and >= 0")
    if np.any(y < 0) or np.any(y > w + 1e-9):
        raise ValueError("y: click counts must satisfy 0 <= y <= weight (impressions)")
    return y, w


def check_groups(groups: Any, n: int, levels: tuple[str, ...] | list[str], who: str) -> dict[str, np.ndarray]:
    """Pick `levels` out of a groups dict, accepting `account` for `account_id` and back."""
    if groups is None:
        raise ValueError(f"{who}: groups is None; pass a dict {{level: array[N]}} with keys {list(levels)}")
    if not isinstance(groups, dict):
        raise ValueError(f"{who}: groups must be a dict {{level: array[N]}}, got {type(groups).__name__}")
    out = {}
    for lvl in levels:
        key = resolve_level(groups, lvl)
        if key is None:
            raise ValueError(
                f"{who}: groups has no level {lvl!r} (have {sorted(groups)}); "
                f"pass groups[{lvl!r}] or configure the levels to match"
            )
        arr = np.asarray(groups[key])
        if arr.shape != (n,):
            raise ValueError(f"{who}: groups[{key!r}] has shape {arr.shape}, expected ({n},)")
        out[lvl] = arr
    return out


def resolve_level(groups: dict, level: str) -> str | None:
    if level in groups:
        return level
    alt = level[:-3] if level.endswith("_id") else f"{level}_id"
    return alt if alt in groups else None


def as_keys(arr: np.ndarray) -> np.ndarray:
    """Group keys as strings, so an int key and its JSON round trip ("7") agree."""
    a = np.asarray(arr)
    if a.dtype.kind in "iu":
        return a.astype(str)
    if a.dtype.kind == "f":
        # 3.0 and "3" are the same group once keys pass through JSON / pandas
        as_int = a.astype(np.int64)
        return np.where(a == as_int, as_int.astype(str), a.astype(str))
    return a.astype(str)


def figure_or_file(fig: Any, path: Any) -> Any:
    """A plot method's return: the matplotlib Figure when `path` is None, else the PNG written there (a Path).
    Figures are built without pyplot, so no global backend or figure list is touched."""
    if path is None:
        return fig
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def binomial_nll(eta: np.ndarray, clicks: np.ndarray, imps: np.ndarray) -> float:
    """Mean binomial negative log-likelihood of logits eta (per impression)."""
    return float(-(clicks * log_expit(eta) + (imps - clicks) * log_expit(-eta)).sum() / max(imps.sum(), 1e-12))


class Calibrator(abc.ABC):
    """Base class: logits -> calibrated probabilities, JSON-serialisable."""

    type_name: ClassVar[str] = ""

    fitted_: bool = False

    @abc.abstractmethod
    def fit(self, scores: Any, y: Any, groups: dict | None = None, weight: Any = None) -> Calibrator:
        """Fit on logits `scores` and labels `y`; return self."""

    @abc.abstractmethod
    def transform_logit(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        """Calibrated logits."""

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """Fitted state (JSON-able)."""

    @abc.abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Inverse of `_state`."""

    def transform(self, scores: Any, groups: dict | None = None) -> np.ndarray:
        return sigmoid(self.transform_logit(scores, groups))

    def fit_transform(self, scores: Any, y: Any, groups: dict | None = None, weight: Any = None) -> np.ndarray:
        return self.fit(scores, y, groups=groups, weight=weight).transform(scores, groups)

    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {"type": self.type_name, "params": self._params(), "state": self._state()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        obj = cls(**d.get("params", {}))
        obj._load_state(d["state"])
        obj.fitted_ = True
        return obj

    def _require_fitted(self) -> None:
        if not self.fitted_:
            raise RuntimeError(f"{type(self).__name__}: not fitted; call fit(scores, y) first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from `to_dict()` output (registry lookup, no imports)."""
    if not isinstance(d, dict) or "type" not in d or "state" not in d:
        raise ValueError("calibrator_from_dict: expected a dict with 'type' and 'state' (from to_dict())")
    cls = _REGISTRY.get(d["type"])
    if cls is None:
        raise ValueError(f"calibrator_from_dict: unknown calibrator type {d['type']!r}; known: {sorted(_REGISTRY)}")
    return cls.from_dict(d)
