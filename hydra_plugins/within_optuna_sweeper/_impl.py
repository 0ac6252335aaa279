"""PruningOptunaSweeperImpl: Hydra's OptunaSweeperImpl plus what pruning needs (docs/sweeps.md).

The parent asks Optuna for a batch of trials, launches one job per trial, and tells each trial its
job's outcome: COMPLETE with the returned value, or FAIL if the job raised (a failure, counted
against max_failure_rate). With a pruner set, this subclass

1. adds each trial's identity to its job's overrides, `+optuna_trial.{number,study_name,storage}`.
   The job's pruning callback (within/lit/pruning.py) reports to that trial each epoch and asks the
   pruner, which the job builds from the same `hydra.sweeper.pruner`;
2. tells PRUNED to a trial whose job raised optuna.TrialPruned, and does not count it as a failure.
   The parent's tell loop has no hook for that, so two small wrappers do it: one on the launcher (a
   pruned job is noted, and handed to the parent as completed), one on the study's `tell` (a noted
   trial is told PRUNED, whatever the parent tells it).

Without a pruner it is Hydra's sweeper unchanged.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import Trial, TrialState

log = logging.getLogger(__name__)


class PruningOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, pruner: optuna.pruners.BasePruner | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
            raise ValueError(f"hydra.sweeper.pruner: {pruner!r} is not an optuna pruner; set its _target_ to an "
                             "optuna.pruners class (e.g. optuna.pruners.MedianPruner), or hydra.sweeper.pruner=null")
        if pruner is not None and not isinstance(self.storage, str):
            raise ValueError("hydra.sweeper.pruner: pruning needs a storage URL every job can open, and "
                             f"hydra.sweeper.storage is {self.storage!r}; set it (e.g. sqlite:///optuna.db), "
                             "or hydra.sweeper.pruner=null")
        self.pruner = pruner
        self.pruned: set[int] = set()  # numbers of the trials whose job raised optuna.TrialPruned

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if self.pruner is not None:
            self.launcher = PrunedJobs(self.launcher, self.pruned)

    def sweep(self, arguments: list[str]) -> None:
        log.info(f"Pruner: {type(self.pruner).__name__ if self.pruner is not None else None}")
        super().sweep(arguments)

    def _configure_trials(self, trials: list[Trial], search_space_distributions: dict[str, BaseDistribution],
                          fixed_params: dict[str, Any]) -> Sequence[Sequence[str]]:
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        if self.pruner is None:
            return overrides
        for trial in trials:  # the study the parent made in sweep(), reached through its trials
            tell_noted_as_pruned(trial.study, self.pruned)
        return [(*job, *trial_overrides(trial, str(self.storage))) for trial, job in zip(trials, overrides)]


def trial_overrides(trial: Trial, storage: str) -> list[str]:
    """What a job needs to rebuild its trial: `optuna.load_study(study_name, storage)`, then the number."""
    return [f"+optuna_trial.number={trial.number}", f"+optuna_trial.study_name={quoted(trial.study.study_name)}",
            f"+optuna_trial.storage={quoted(storage)}"]


def quoted(value: str) -> str:
    """`value` as a quoted override value (a path may hold spaces, quotes or '='). Hydra's escapes: the
    quote gets a backslash, and backslashes that run into a quote or the end are doubled."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


class PrunedJobs:
    """The launcher, with each job that raised optuna.TrialPruned noted in `pruned` and handed to the
    parent as completed: else the parent tells it FAIL and counts a failure. Its return value is a
    placeholder the parent only float()s, since `tell_noted_as_pruned` tells the trial PRUNED."""

    def __init__(self, launcher: Any, pruned: set[int]) -> None:
        self.launcher, self.pruned = launcher, pruned

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        for ret in returns:
            # ret.return_value would re-raise the job's exception; the exception itself is _return_value
            if ret.status != JobStatus.FAILED or not isinstance(ret._return_value, optuna.TrialPruned):
                continue
            number = OmegaConf.select(ret.cfg, "optuna_trial.number")
            if number is None:  # raised by the job's own code, not by a trial's pruning callback: a failure
                continue
            self.pruned.add(int(number))
            ret.status, ret.return_value = JobStatus.COMPLETED, float("nan")
        return returns


def tell_noted_as_pruned(study: optuna.Study, pruned: set[int]) -> None:
    """Wrap `study.tell` (once per study) so that a trial whose number is in `pruned` is told PRUNED."""
    if getattr(study.tell, "pruned", None) is pruned:
        return
    tell = study.tell

    def tell_pruned(trial: Any, values: Any = None, state: TrialState = TrialState.COMPLETE) -> None:
        number = trial if isinstance(trial, int) else trial.number
        if number not in pruned:
            return tell(trial, values=values, state=state)
        log.info(f"Pruned trial {number}")
        return tell(trial, state=TrialState.PRUNED)  # no values: the job's reports are its intermediate values

    tell_pruned.pruned = pruned  # type: ignore[attr-defined]
    study.tell = tell_pruned  # type: ignore[method-assign]
