"""FeatureSpec: one schema for training, evaluation and serving.

Read from `conf/features/<name>.yaml`; saved as `spec.json` in every bundle. It is also what
rejects bad input: each error names the field (and the row, where there is one) and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

FIELD_TYPES = ("numeric", "categorical", "text", "image", "group")
NUMERIC_TRANSFORMS = ("none", "log1p", "signed_log1p")


class FeatureError(ValueError):
    """Bad raw input or a bad feature spec; the message names the field."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    required: bool = True
    # numeric
    transform: str = "none"
    # categorical / group
    min_count: int = 1
    max_vocab: int | None = None
    embedding_dim: int | None = None
    level: str | None = None
    embed: bool = True
    demographic: bool = False  # an audience attribute that fairness reports group by; the model's inputs ignore it
    # text
    max_tokens: int = 32
    n_buckets: int = 2**15
    # image
    size: int = 16
    channels: int = 3
    augment: bool = False  # the creative's effect ignores position and orientation: training may flip/shift it

    def __post_init__(self) -> None:
        where = f"feature '{self.name}'"
        if self.type not in FIELD_TYPES:
            raise FeatureError(f"{where}: type {self.type!r} is not one of {FIELD_TYPES}")
        if self.type == "numeric" and self.transform not in NUMERIC_TRANSFORMS:
            raise FeatureError(f"{where}: transform {self.transform!r} is not one of {NUMERIC_TRANSFORMS}")
        if self.demographic and self.type not in ("categorical", "group"):
            raise FeatureError(
                f"{where}: demographic applies to categorical or group fields, not {self.type}; "
                "bucket the values into a categorical field (e.g. age bands) and mark that one"
            )
        for key in ("min_count", "max_tokens", "n_buckets", "size", "channels"):
            if int(getattr(self, key)) < 1:
                raise FeatureError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")

    @property
    def is_categorical(self) -> bool:
        return self.type == "categorical" or (self.type == "group" and self.embed)


_FIELD_KEYS = {f.name for f in dataclasses.fields(FieldSpec)}


@dataclasses.dataclass
class FeatureSpec:
    fields: list[FieldSpec]
    label: str = "clicked"
    weight: str | None = None
    time: str | None = None
    truth: str | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise FeatureError(f"features: field names repeat: {sorted(dup)}")
        if not self.fields:
            raise FeatureError("features.fields: empty; declare at least one feature")
        if self.label in names:
            raise FeatureError(f"features: label column '{self.label}' is also declared as a feature")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FeatureSpec:
        """Build from a Hydra/omegaconf node or a plain dict; unknown keys fail with a suggestion."""
        if hasattr(cfg, "_metadata"):  # an omegaconf node
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg)
        top_keys = {"fields", "label", "weight", "time", "truth", "name"}
        for key in cfg:
            if key not in top_keys:
                raise FeatureError(f"features.{key}: unknown key{_suggest(key, top_keys)}")
        fields = []
        for i, raw in enumerate(cfg.get("fields") or []):
            raw = dict(raw)
            name = raw.get("name")
            if not name or "type" not in raw:
                raise FeatureError(f"features.fields[{i}]: each field needs 'name' and 'type', got {raw}")
            for key in raw:
                if key not in _FIELD_KEYS:
                    raise FeatureError(
                        f"features.fields[{i}] ('{name}'): unknown option '{key}'{_suggest(key, _FIELD_KEYS)}"
                    )
            fields.append(FieldSpec(**raw))
        return cls(
            fields=fields,
            label=cfg.get("label", "clicked"),
            weight=cfg.get("weight"),
            time=cfg.get("time"),
            truth=cfg.get("truth"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "weight": self.weight,
            "time": self.time,
            "truth": self.truth,
            "fields": [dataclasses.asdict(f) for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        return cls.from_config(d)

    # ---- views --------------------------------------------------------------------------
    def of_type(self, *types: str) -> list[FieldSpec]:
        return [f for f in self.fields if f.type in types]

    @property
    def numeric(self) -> list[FieldSpec]:
        return self.of_type("numeric")

    @property
    def categorical(self) -> list[FieldSpec]:
        """Fields embedded as categoricals: categorical ones, then groups with embed=True."""
        return self.of_type("categorical") + [f for f in self.of_type("group") if f.embed]

    @property
    def text(self) -> list[FieldSpec]:
        return self.of_type("text")

    @property
    def image(self) -> list[FieldSpec]:
        return self.of_type("image")

    @property
    def groups(self) -> list[FieldSpec]:
        return self.of_type("group")

    @property
    def demographic(self) -> list[FieldSpec]:
        """Fields marked `demographic: true`: the groups a fairness report compares."""
        return [f for f in self.fields if f.demographic]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    # ---- validation of raw input --------------------------------------------------------
    def validate_frame(self, df: pd.DataFrame, require_label: bool = False) -> None:
        """Raise FeatureError naming the field (and first bad row) for missing/mistyped/NaN input."""
        if not isinstance(df, pd.DataFrame):
            raise FeatureError(f"input: expected a pandas DataFrame, dict or list of dicts, got {type(df).__name__}")
        if len(df) == 0:
            raise FeatureError("input: empty DataFrame (0 rows); pass at least one record")
        needed = [f.name for f in self.fields if f.required]
        if require_label:
            needed.append(self.label)
            if self.weight:
                needed.append(self.weight)
        missing = [n for n in needed if n not in df.columns]
        if missing:
            raise FeatureError(
                f"field '{missing[0]}': required but missing from the input "
                f"(missing: {missing}; present: {sorted(map(str, df.columns))[:20]})"
            )
        for f in self.fields:
            if f.name not in df.columns:
                continue
            col = df[f.name]
            if f.type == "numeric":
                _check_numeric(f.name, col, allow_nan=not f.required)
            elif f.type in ("categorical", "group", "text") and f.required:
                bad = col.isna().to_numpy()
                if bad.any():
                    row = _row_label(df, int(np.argmax(bad)))
                    raise FeatureError(
                        f"field '{f.name}': missing value at row {row}; it is required "
                        f"(set required: false in the features spec to allow it)"
                    )
            if f.type == "text":
                nonstr = col.map(lambda v: not (isinstance(v, str) or _is_missing(v))).to_numpy()
                if nonstr.any():
                    i = int(np.argmax(nonstr))
                    raise FeatureError(
                        f"field '{f.name}': expected text (str), got {type(col.iloc[i]).__name__} "
                        f"{col.iloc[i]!r} at row {_row_label(df, i)}"
                    )
        if require_label:
            _check_numeric(self.label, df[self.label], allow_nan=False)
            y = df[self.label].to_numpy(dtype=np.float64)
            if self.weight:
                _check_numeric(self.weight, df[self.weight], allow_nan=False)
                w = df[self.weight].to_numpy(dtype=np.float64)
                bad = (y < 0) | (y > w) | (w <= 0)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise FeatureError(
                        f"field '{self.label}': row {_row_label(df, i)} has {y[i]} clicks for "
                        f"{w[i]} impressions ('{self.weight}'); need 0 <= clicks <= impressions, impressions > 0"
                    )
            elif not np.isin(y, (0.0, 1.0)).all():
                i = int(np.argmax(~np.isin(y, (0.0, 1.0))))
                raise FeatureError(
                    f"field '{self.label}': expected 0/1 labels, got {y[i]} at row {_row_label(df, i)} "
                    f"(for aggregated rows set features.weight to the impressions column)"
                )

    def records_to_frame(self, X: Any) -> pd.DataFrame:
        """Accept a DataFrame, one record dict, or a list of dicts; return a DataFrame."""
        if isinstance(X, pd.DataFrame):
            return X
        if isinstance(X, Mapping):
            return pd.DataFrame([dict(X)])
        if isinstance(X, Sequence) and not isinstance(X, (str, bytes)):
            if len(X) == 0:
                raise FeatureError("input: empty list of records; pass at least one record")
            bad = [i for i, r in enumerate(X) if not isinstance(r, Mapping)]
            if bad:
                raise FeatureError(f"input: record {bad[0]} is a {type(X[bad[0]]).__name__}, expected a dict")
            return pd.DataFrame([dict(r) for r in X])
        raise FeatureError(f"input: expected a pandas DataFrame, dict or list of dicts, got {type(X).__name__}")


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _row_label(df: pd.DataFrame, i: int) -> Any:
    return df.index[i] if i < len(df.index) else i


def _check_numeric(name: str, col: pd.Series, allow_nan: bool) -> None:
    if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
        converted = pd.to_numeric(col, errors="coerce")
        bad = converted.isna().to_numpy() & ~col.isna().to_numpy()
        i = int(np.argmax(bad)) if bad.any() else 0
        raise FeatureError(
            f"field '{name}': expected numbers, got {type(col.iloc[i]).__name__} {col.iloc[i]!r} "
            f"at row {col.index[i]}"
        )
    if not allow_nan:
        bad = ~np.isfinite(col.to_numpy(dtype=np.float64))
        if bad.any():
            i = int(np.argmax(bad))
            raise FeatureError(
                f"field '{name}': {col.iloc[i]} at row {col.index[i]} is not a finite number; it is required "
                f"(set required: false in the features spec to impute it)"
            )


def _suggest(key: str, options: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {sorted(options)}"
