"""Python entry to the training pipeline: what `AdScorePredictor(...).fit(df)` runs.

It composes the same Hydra config as `train.py` (conf/train.yaml plus overrides), swaps in the
caller's DataFrame and feature spec, runs `run_train`, and loads the bundle it wrote.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from within.features.spec import FeatureError, FeatureSpec

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SEED_KEYS = {
    "numerical_features": "numeric", "numeric_features": "numeric", "categorical_features": "categorical",
    "text_features": "text", "image_features": "image", "group_features": "group",
}


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                   data_dir: str | Path | None = None, config_name: str = "train") -> Any:
    """conf/<config_name>.yaml plus `overrides`, composed as `train.py` would (HydraConfig set), for
    running `run_train` from Python (benchmarks, notebooks). `output_dir` becomes the run directory."""
    import within.pipeline  # noqa: F401  (registers resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(CONF_DIR.parent)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
        if output_dir is not None:
            cfg.paths.output_dir = cfg.paths.log_dir = str(output_dir)
    return cfg


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


def fit_predictor(
    X: pd.DataFrame,
    y: Sequence[float] | np.ndarray | None = None,
    processor_spec: FeatureSpec | None = None,
    feature_config: Mapping[str, Any] | None = None,
    label: str = "clicked",
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
) -> Any:
    from within.models.predictor import AdScorePredictor
    from within.pipeline.train import run_train

    if not isinstance(X, pd.DataFrame):
        raise FeatureError(f"fit: expected a pandas DataFrame, got {type(X).__name__}")
    df = X if y is None else X.assign(**{label: np.asarray(y)})
    if processor_spec is None and feature_config is None:
        raise FeatureError("fit: pass feature_config={...} (or a FeatureSpec) to say which columns are features")
    spec = processor_spec or spec_from_feature_config(feature_config, df, label)
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
    return AdScorePredictor.load(out / "bundle")
