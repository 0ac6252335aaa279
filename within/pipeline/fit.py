"""Training from Python on a DataFrame: what `AdScorePredictor(...).fit(df)` runs.

It composes the same Hydra config as `train.py` (conf/train.yaml plus overrides), swaps in the
caller's rows and feature spec, and runs `run_train`; the caller loads the bundle it wrote.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import open_dict

from within.features.spec import FeatureError, FeatureSpec
from within.pipeline.compose import CONF_DIR, compose_config
from within.pipeline.train import run_train

SEED_KEYS = {
    "numerical_features": "numeric", "numeric_features": "numeric", "categorical_features": "categorical",
    "text_features": "text", "image_features": "image", "group_features": "group",
}


def spec_from_feature_config(feature_config: Mapping[str, Any], df: pd.DataFrame, label: str) -> FeatureSpec:
    """The seed's `feature_config` ({"text_features": [...], "numerical_features": [...], ...}) as a FeatureSpec.

    Image size and channels are read off the first image in the frame.
    """
    fields: list[dict[str, Any]] = []
    for key, names in feature_config.items():
        if key not in SEED_KEYS:
            raise FeatureError(f"feature_config: unknown key '{key}'; allowed: {sorted(SEED_KEYS)}")
        for name in names:
            if name not in df.columns:
                raise FeatureError(f"feature_config.{key}: column '{name}' is not in the DataFrame")
            field: dict[str, Any] = {"name": name, "type": SEED_KEYS[key]}
            if field["type"] == "image":
                first = next(v for v in df[name] if v is not None)
                shape = np.asarray(first).shape
                field.update(channels=int(shape[0]), size=int(shape[-1]))
            if field["type"] == "group":
                field["level"] = name
            fields.append(field)
    return FeatureSpec.from_config({"label": label, "fields": fields})


def training_frame(X: Any, y: Any, label: str) -> pd.DataFrame:
    if not isinstance(X, pd.DataFrame):
        raise FeatureError(f"fit: expected a pandas DataFrame, got {type(X).__name__}")
    return X if y is None else X.assign(**{label: np.asarray(y)})


def fit_frame(df: pd.DataFrame, spec: FeatureSpec, overrides: Sequence[str] = (),
              output_dir: str | Path | None = None) -> Path:
    """Train on `df` through `run_train` (train.py's config + `overrides`); returns the run directory."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(output_dir) if output_dir else CONF_DIR.parent / "outputs" / "fit" / "runs" / stamp
    cfg = compose_config(overrides, output_dir=out)
    with open_dict(cfg):
        cfg.features = spec.to_dict()
        cfg.task_name = "fit"
        cfg.extras.print_config = False
        if not spec.time:
            cfg.data.split.method = "random"
    run_train(cfg, source=df)
    return out
