"""Evaluate a bundle (or a checkpoint) on any data config, with the same metric names as train.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from within.data.datamodule import split_frame
from within.models.base import BundleError
from within.models.predictor import AdScorePredictor
from within.pipeline.config import ConfigError, register_resolvers, validate_config
from within.pipeline.report import plot_reliability, score_frame, write_markdown, write_metrics

log = logging.getLogger(__name__)


def load_predictor(bundle: str | None, ckpt_path: str | None) -> AdScorePredictor:
    """A bundle as saved; or a checkpoint's weights inside its own run's bundle (spec, calibrator)."""
    if bool(bundle) == bool(ckpt_path):
        raise ConfigError("evaluate: set exactly one of bundle=PATH or ckpt_path=PATH")
    if bundle:
        return AdScorePredictor.load(bundle)
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path: {ckpt} does not exist")
    run_bundle = ckpt.resolve().parents[1] / "bundle"
    if not run_bundle.is_dir():
        raise BundleError(f"ckpt_path: no bundle/ beside {ckpt} (expected {run_bundle}) to supply the feature spec")
    predictor = AdScorePredictor.load(run_bundle)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    predictor.net.load_state_dict(net_state)
    return predictor


def run_evaluate(cfg: DictConfig) -> dict[str, float]:
    register_resolvers()
    validate_config(cfg, "evaluate")
    predictor = load_predictor(cfg.get("bundle"), cfg.get("ckpt_path"))
    dm = instantiate(
        cfg.data, features=OmegaConf.to_container(cfg.features, resolve=True), seed=cfg.seed,
        processor=predictor.processor,
    )
    frame = dm.load_frame()
    split = cfg.get("split", "test")
    if split != "all":
        frames = split_frame(frame, dm.spec, dm.split_method, dm.val_frac, dm.test_frac, dm.seed, dm.calib_frac)
        if split not in frames:
            raise ConfigError(f"split: {split!r} is not one of {sorted(frames)} or 'all'")
        frame = frames[split]
    metrics, p = score_frame(predictor, frame, "test" if split == "all" else split)
    out_dir = Path(cfg.paths.output_dir)
    report = out_dir / "report"
    write_metrics(metrics, report)
    spec = predictor.processor.spec
    truth = frame[spec.truth].to_numpy(dtype=float) if spec.truth and spec.truth in frame else None
    weight = frame[spec.weight].to_numpy(dtype=float) if spec.weight else None
    plot_reliability({"model": p}, frame[spec.label].to_numpy(dtype=float), report / "reliability.png",
                     truth=truth, weight=weight)
    write_markdown(report, metrics)
    print(json.dumps(metrics, indent=2))
    print(out_dir)
    return metrics
