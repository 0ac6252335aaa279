"""model=ensemble: K members trained on the same data and splits, combined by a CalibratedEnsemble.

Member k runs its member recipe (`model.member`, the nn settings by default) with model seed
`seed + k`, plus `model.member_overrides[k - 1]` where given (members of other settings: keys of the
run config, with `model` meaning the member's model node). Member 0 writes its checkpoints in the
run directory, member k under members/<k>/. `model.bundles` adds saved models as further members.
The configured calibrator (`calibrator=...`) is fitted on the ensemble by the `calibrate` step.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from within.models.base import BaseMLModel
from within.models.ensemble import CalibratedEnsemble
from within.pipeline.config import ConfigError, validate_config
from within.pipeline.privacy import privacy_enabled
from within.pipeline.recipe import FitResult, TrainRun

_MISSING = object()
SHARED_DATA_KEYS = ("data", "features", "text_model", "seed")  # members equal in these share one datamodule


class EnsembleRecipe:
    """Recipe for model=ensemble. Args are the `model:` node."""

    def __init__(self, member: DictConfig, size: int = 3, member_overrides: Sequence[Mapping[str, Any]] = (),
                 bundles: Sequence[str] = (), aggregation_method: str = "mean", trim_fraction: float = 0.2,
                 weight_window: int | None = None) -> None:
        self.member = member
        self.size = int(size)
        self.member_overrides = [dict(e) if isinstance(e, Mapping) else e for e in (member_overrides or [])]
        self.bundles = list(bundles or [])
        self.aggregation_method, self.trim_fraction = aggregation_method, float(trim_fraction)
        self.weight_window = weight_window

    def member_config(self, cfg: DictConfig, k: int, run_dir: str | Path) -> DictConfig:
        """Member k's run config: the run's, with `model` := the member node and its overrides applied."""
        run_dir = Path(run_dir)
        sub = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        with open_dict(sub):
            sub.model = copy.deepcopy(self.member)
            entry = self.member_overrides[k - 1] if 0 < k <= len(self.member_overrides) else {}
            for key, value in entry.items():
                OmegaConf.update(sub, str(key), value, merge=False)
            sub.paths.output_dir = str(run_dir if k == 0 else run_dir / "members" / str(k))
            sub.seed = int(cfg.seed)  # the data seed stays: same rows and splits; the model seed shifts below
            if k > 0:  # a sweep trial's objective is member 0's metric, so only member 0 reports to the pruner
                sub.pop("optuna_trial", None)
        return sub

    def check(self, cfg: DictConfig) -> None:
        """Everything that would fail later fails now, before member 0 trains."""
        size = self.size
        if size < 0 or (size == 0 and not self.bundles):
            raise ConfigError(f"model.size: {size}; train >= 1 members, or set 0 with model.bundles=[path, ...]")
        if size == 0 and cfg.get("train", True):
            raise ConfigError("model.size=0 assembles model.bundles only; set train=false as well")
        if len(self.member_overrides) > max(size - 1, 0):
            raise ConfigError(f"model.member_overrides: {len(self.member_overrides)} entries for members 1..{size - 1}; "
                              f"give at most size - 1 = {max(size - 1, 0)} (member 0 is this run's own config)")
        for k, entry in enumerate(self.member_overrides, start=1):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"model.member_overrides[{k - 1}]: expected a mapping of config keys to values, "
                                  f"e.g. {{model.net.cross_layers: 1}}, got {entry!r}")
            plain = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
            with open_dict(plain):
                plain.model = copy.deepcopy(self.member)
            for key in entry:
                if OmegaConf.select(plain, str(key), default=_MISSING) is _MISSING:
                    raise ConfigError(f"model.member_overrides[{k - 1}]: {key!r} is not a key of a member's config; "
                                      "members take overrides of existing keys only (e.g. model.net.dropout_rate)")
            try:  # a bad value fails now, not after member 0 has trained
                validate_config(self.member_config(cfg, k, cfg.paths.output_dir))
            except ConfigError as err:
                raise ConfigError(f"model.member_overrides[{k - 1}]: {err}") from err
        if size > 1 and privacy_enabled(cfg):
            raise ConfigError(f"model.size={size} with privacy=dp trains {size} models on the same rows, spending "
                              "the privacy budget that many times; use model.size=1 with model.bundles, or privacy=none")

    def fit(self, run: TrainRun) -> FitResult:
        cfg = run.cfg
        self.check(cfg)
        members: list[Any] = []
        first: FitResult | None = None
        shared = None
        for k in range(self.size):
            sub = self.member_config(cfg, k, run.out_dir)
            L.seed_everything(int(cfg.seed) + k, workers=True)
            same_data = all(OmegaConf.select(sub, key) == OmegaConf.select(cfg, key) for key in SHARED_DATA_KEYS)
            init = run.init.base_models[k] if run.init is not None and k < len(run.init.base_models) else None
            member_run = TrainRun(cfg=sub, out_dir=Path(sub.paths.output_dir), source=run.source,
                                  loggers=run.loggers if k == 0 else [], ckpt_path=run.ckpt_path if k == 0 else None,
                                  datamodule=shared if same_data else None, init=init)
            result = instantiate(sub.model, _recursive_=False).fit(member_run)
            if result.model is None:  # a non-zero rank of a distributed run
                return result
            if k == 0:
                first, shared = result, member_run.datamodule
            members.append(result.model)
        members += [BaseMLModel.load(path) for path in self.bundles]
        ensemble = CalibratedEnsemble(
            members, calibration_method=_calibration_name(cfg), aggregation_method=self.aggregation_method,
            trim_fraction=self.trim_fraction,
        )
        frames = first.frames if first is not None else run.data().split()
        if ensemble.aggregation_method == "weighted":
            window = self.weight_window
            ensemble.update_weights(frames["val"], window=None if window is None else int(window))
        if first is None:
            return FitResult(model=ensemble, frames=frames)
        metadata = {**first.metadata, "members": {"trained": self.size, "from_bundles": list(self.bundles)}}
        return FitResult(model=ensemble, frames=frames, metrics=first.metrics, history=first.history,
                         metadata=metadata, log_step=first.log_step)


def _calibration_name(cfg: DictConfig) -> str:
    """The configured calibrator's registered name (what the ensemble records), or 'none'."""
    node = cfg.get("calibrator")
    if not node or "_target_" not in node:
        return "none"
    return instantiate(node, _convert_="all").type_name
