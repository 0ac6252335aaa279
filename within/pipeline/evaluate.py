"""Evaluate a bundle (or a checkpoint) on any data config, with the same metric names as train.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from within.data.datamodule import split_frame
from within.models.base import BaseMLModel, BundleError
from within.pipeline.config import ConfigError, register_resolvers, validate_config
from within.pipeline.report import write_test_report

log = logging.getLogger(__name__)


def load_model(bundle: str | None, ckpt_path: str | None) -> Any:
    """A bundle as saved; or a checkpoint's weights inside its own run's bundle (spec, calibrator)."""
    if bool(bundle) == bool(ckpt_path):
        raise ConfigError("evaluate: set exactly one of bundle=PATH or ckpt_path=PATH")
    if bundle:
        return BaseMLModel.load(bundle)
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path: {ckpt} does not exist")
    run_bundle = ckpt.resolve().parents[1] / "bundle"
    if not run_bundle.is_dir():
        raise BundleError(f"ckpt_path: no bundle/ beside {ckpt} (expected {run_bundle}) to supply the feature spec")
    model = BaseMLModel.load(run_bundle)
    if getattr(model, "net", None) is None:
        raise BundleError(f"ckpt_path: {run_bundle} holds a {type(model).__name__}, which has no network checkpoint")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    model.net.load_state_dict(net_state)
    model.bundle_path = None  # the bundle's ONNX graph holds other weights: score with torch
    return model


def run_evaluate(cfg: DictConfig) -> dict[str, float]:
    register_resolvers()
    validate_config(cfg, "evaluate")
    model = load_model(cfg.get("bundle"), cfg.get("ckpt_path"))
    dm = instantiate(
        cfg.data, features=OmegaConf.to_container(cfg.features, resolve=True), seed=cfg.seed,
        processor=getattr(model, "processor", None),
    )
    frame = dm.load_frame()
    split = cfg.get("split", "test")
    if split != "all":
        frames = split_frame(frame, dm.spec, dm.split_method, dm.val_frac, dm.test_frac, dm.seed, dm.calib_frac)
        if split not in frames:
            raise ConfigError(f"split: {split!r} is not one of {sorted(frames)} or 'all'")
        frame = frames[split]
    out_dir = Path(cfg.paths.output_dir)
    metrics: dict[str, float] = {}
    write_test_report(model, frame, out_dir / "report", split="test" if split == "all" else split, metrics=metrics)
    print(json.dumps(metrics, indent=2))
    print(out_dir)
    return metrics
