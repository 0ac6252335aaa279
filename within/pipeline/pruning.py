"""The job side of hparams_search=optuna's pruning: the trial the sweeper names in `optuna_trial`
(hydra_plugins/within_optuna_sweeper) -> the callback that reports to it (within/lit/pruning.py)."""
from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from within.pipeline.config import ConfigError

TRIAL_KEYS = ("number", "study_name", "storage")


def pruning_callbacks(cfg: DictConfig) -> list[Any]:
    """[OptunaPruning] when this job is a trial of a pruning sweep, else []. The pruner comes from
    `hydra.sweeper.pruner`, the config the sweeper was built from."""
    trial = cfg.get("optuna_trial")
    if not trial:
        return []
    missing = [k for k in TRIAL_KEYS if trial.get(k) is None]
    if missing:
        raise ConfigError(f"optuna_trial: no {', '.join(missing)}; the pruning sweeper (hparams_search=optuna) sets "
                          f"{', '.join(TRIAL_KEYS)} for each job, so leave optuna_trial to it")
    pruner = sweeper_pruner()
    if pruner is None:
        raise ConfigError("optuna_trial: set, but hydra.sweeper.pruner is not; a trial is only named to a job "
                          "by the pruning sweeper (hparams_search=optuna), which needs a pruner")
    if not cfg.get("optimized_metric"):
        raise ConfigError("optimized_metric: null, but the trial's pruner needs a metric every epoch; set it "
                          "(hparams_search=optuna: val/logloss), or hydra.sweeper.pruner=null")
    from within.lit.pruning import OptunaPruning

    return [OptunaPruning(storage=str(trial.storage), study_name=str(trial.study_name), number=int(trial.number),
                          pruner=pruner, monitor=str(cfg.optimized_metric))]


def sweeper_pruner() -> Any:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    node = HydraConfig.get().sweeper.get("pruner")
    return instantiate(node) if node is not None else None
