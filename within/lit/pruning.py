"""`OptunaPruning`: a sweep trial reports its validation metric to its Optuna study every epoch, and
stops once the study's pruner says so (hparams_search=optuna; docs/sweeps.md "Pruning").

Not optuna.integration.PyTorchLightningPruningCallback: in optuna 2.10 it subclasses the separate
`pytorch_lightning` package's Callback, reports during the sanity check, and reports and asks the
storage from every DDP rank.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class OptunaPruning(Callback):
    """Reports `monitor` at the end of every validation epoch (step = epoch) to trial `number` of study
    `study_name` in `storage`, and raises optuna.TrialPruned once `pruner` prunes it; the sweeper
    then records the trial as PRUNED. Only rank 0 opens the storage; the other ranks get its decision."""

    def __init__(self, storage: str, study_name: str, number: int, pruner: Any, monitor: str) -> None:
        self.storage, self.study_name, self.number = storage, study_name, int(number)
        self.pruner, self.monitor = pruner, monitor
        self.trial: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.trial is not None or not trainer.is_global_zero:
            return
        import optuna

        # the pruner is not in the storage: every process that asks it builds its own
        study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=self.pruner)
        # optuna 2.10 rebuilds a running trial from its id; the sweeper names the number, which users see
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, self.number)
        self.trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        import optuna

        epoch, value, prune = trainer.current_epoch, None, False
        if trainer.is_global_zero:
            metric = trainer.callback_metrics.get(self.monitor)
            if metric is None:
                names = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))
                raise ValueError(f"optimized_metric: {self.monitor!r} is not logged at validation, and the pruner "
                                 f"needs it every epoch; set it to one of: {names}, or hydra.sweeper.pruner=null")
            value = float(metric)
            self.trial.report(value, step=epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            seen = f" ({self.monitor}={value:.4g})" if value is not None else ""  # rank 0 knows the value
            raise optuna.TrialPruned(f"trial {self.number} pruned at epoch {epoch}{seen}")
