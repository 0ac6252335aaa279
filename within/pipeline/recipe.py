"""The recipe contract: one small Protocol that every model kind implements (torchtune's shape).

A recipe is the `_target_` of a `model=` option. `run_train` instantiates it from the composed
config and calls `fit(run)`; the recipe trains its model kind on the run's data and returns a
`FitResult`. Everything around the fit (seeding, loggers, the bundle, the post-fit steps, the test
report) is the runner's, written once in within/pipeline/train.py. A new model kind is one recipe
file and one conf/model/<name>.yaml.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd
from omegaconf import DictConfig


@dataclasses.dataclass
class TrainRun:
    """What a recipe gets: the composed config, where to write, the data, and the run's loggers."""

    cfg: DictConfig
    out_dir: Path
    source: pd.DataFrame | None = None      # rows given from Python instead of cfg.data.source
    loggers: list[Any] = dataclasses.field(default_factory=list)
    ckpt_path: str | None = None            # resolved resume checkpoint (ckpt_path=auto -> last.ckpt or None)
    datamodule: Any = None                  # a set-up datamodule to reuse (ensemble members share one)
    init: Any = None                        # a fitted model to start from (an update: warm start)

    def data(self) -> Any:
        """The run's datamodule, built (but not set up) on first use; a warm start keeps the
        fitted model's feature processor, so the inputs mean what they meant."""
        if self.datamodule is None:
            from within.pipeline.data import build_datamodule

            self.datamodule = build_datamodule(self.cfg, self.source, processor=getattr(self.init, "processor", None))
        return self.datamodule


@dataclasses.dataclass
class FitResult:
    """What a recipe returns. `model` is None on the non-zero ranks of a distributed run."""

    model: Any                               # a fitted BaseMLModel with predict_logits(X) and spec
    frames: dict[str, pd.DataFrame]          # train / val / calib / test splits
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)    # train/... and val/...
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per epoch, for the curve
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)    # bundle metadata (checkpoint, privacy)
    log_step: int = 0                        # the step at which the loggers record test metrics
    summary: dict[str, str] = dataclasses.field(default_factory=dict)     # report.md sections
    spec: Any = None                         # the rows' FeatureSpec, for a model that keeps none of its own


@runtime_checkable
class Recipe(Protocol):
    """One model kind: fit from the composed config on the run's data, return the fitted model."""

    def fit(self, run: TrainRun) -> FitResult: ...


__all__ = ["FitResult", "Recipe", "TrainRun"]
