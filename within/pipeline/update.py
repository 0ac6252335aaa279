"""Updating a fitted model with new labelled rows, through the same pipeline that trained it.

The run config saved in the bundle is replayed on the new rows, starting from the fitted model:
networks (and each member of an ensemble) fine-tune from their weights, with the same feature
processor, for `update.epochs` epochs at `update.lr_scale` times the learning rate; DynamicLinear
goes on with FTRL (`fit_incremental`) from its state. The new rows are split as the data config
splits (train / val / calib / test), the post-fit steps run again (the calibrator is refitted on
the new calib rows) and the result is a new bundle whose metadata lists every version with the
rows it trained on.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf, open_dict

from within.models.base import BundleError
from within.pipeline.compose import CONF_DIR
from within.pipeline.config import ConfigError
from within.pipeline.train import run_train

DEFAULTS = {"epochs": 2, "lr_scale": 0.5}


def update_config(model: Any, overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> Any:
    """The saved run config of `model`, set up for a warm-start run into `output_dir`."""
    saved = (model.metadata or {}).get("config")
    if not saved:
        raise BundleError("update: this bundle holds no run config (it was not written by train.py or fit); "
                          "retrain it with AdScorePredictor(...).fit or python train.py")
    cfg = OmegaConf.create(saved)
    settings = {**DEFAULTS, **dict(cfg.get("update") or {})}
    if cfg.get("privacy") and cfg.privacy.get("enabled"):
        raise ConfigError("update: the model was trained with privacy=dp; fine-tuning it on more rows would spend "
                          "more privacy budget than its report states. Train a new private model on all rows instead")
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(output_dir) if output_dir else CONF_DIR.parent / "outputs" / "update" / "runs" / stamp
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(out)
        cfg.task_name, cfg.ckpt_path, cfg.train, cfg.test = "update", None, True, True
        cfg.extras.print_config = False
        cfg.trainer.max_epochs = int(settings["epochs"])
        for node in _optimizers(cfg.model):
            node.lr = float(node.lr) * float(settings["lr_scale"])
        cfg.update = settings
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))) if overrides else cfg


def _optimizers(model_node: Any) -> list[Any]:
    """The optimizer nodes of a model config (the model's own, or an ensemble member's)."""
    out = []
    for node in (model_node, model_node.get("member")):
        if node is not None and node.get("optimizer") is not None and "lr" in node.optimizer:
            out.append(node.optimizer)
    return out


def update_model(model: Any, frame: pd.DataFrame, overrides: Sequence[str] = (),
                 output_dir: str | Path | None = None) -> Path:
    """Fine-tune `model` on `frame` (features + label); returns the new run directory (its bundle/)."""
    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(f"update: new_data must be a pandas DataFrame with the label column, got {type(frame).__name__}")
    cfg = update_config(model, overrides, output_dir)
    run_train(cfg, source=frame, init=model)
    return Path(cfg.paths.output_dir)
