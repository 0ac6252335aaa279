"""hparams_search=optuna end to end: `train.py -m` in a subprocess on a tiny simulator world.

The search space is one parameter, model.net.dropout_rate in {0.0, 1.5}; 1.5 is not a probability,
so a trial that draws it raises while its network is built (the crash on purpose). Optuna's
RandomSampler with seed 10 draws 0.0, 1.5, 0.0 for the first three trials (a restarted sweep starts
the same sequence again), so the counts below are known; each trial's state is also checked against
its own draw. Everything is read back from the study's SQLite storage, not from the logs.

The pruning sweep searches model.optimizer.lr in {0.01, 1e-6, -1.0} (seed 28 draws them in that
order): a net trained at 0.01, one that barely moves from its start, and a learning rate AdamW refuses.
With a MedianPruner that prunes from the first completed trial on, the second trial's epoch-0 logloss
(~0.69, the untrained net) is worse than the first's (~0.44), so it is pruned there. That sweep stops
at its first failure (max_failure_rate=0.0), so reaching the third trial shows that a pruned trial is
not counted as one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from within.pipeline.train import objective_value

ROOT = Path(__file__).resolve().parents[1]
STUDY = "within_train"
CRASH = 1.5
# the search space is the command line's one choice (hydra.sweeper.params=null drops the config's);
# everything else is fixed
TINY = ["data.source.n=3000", "data.batch_size=512", "trainer.max_epochs=1", "model.net.hidden_dims=[16]",
        "model.optimizer.lr=0.003", "postfit=[]", "logger=none", "extras.print_config=false"]
SPACE = ["hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=10", "hydra.sweeper.params=null",
         f"model.net.dropout_rate=choice(0.0,{CRASH})"]


# the pruning sweep: 3 epochs, so that a trial can stop before its last; the pruner acts from trial 1, epoch 0
EPOCHS = 3
PRUNE_TINY = [a for a in TINY if not a.startswith(("trainer.max_epochs=", "model.optimizer.lr="))] + [
    f"trainer.max_epochs={EPOCHS}"]
GOOD_LR, STILL_LR, BAD_LR = 0.01, 1e-6, -1.0
PRUNE_SPACE = ["hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=28", "hydra.sweeper.params=null",
               f"model.optimizer.lr=choice({GOOD_LR},{STILL_LR},{BAD_LR})",
               "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0",
               "hydra.sweeper.max_failure_rate=0.0"]


def sweep(tmp_path: Path, n_trials: int, args: list[str] = TINY + SPACE) -> subprocess.CompletedProcess:
    env = {**os.environ, "WITHIN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna",
                           f"hydra.sweeper.n_trials={n_trials}", *args],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def trials(tmp_path: Path) -> list:
    import optuna

    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"  # hparams_search=optuna's default storage
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def states(found: list) -> Counter:
    return Counter(t.state.name for t in found)


def check_each_trial(found: list, tmp_path: Path) -> None:
    """The crash value's trials failed with their traceback kept; the others completed with a logloss."""
    for t in found:
        if float(t.params["model.net.dropout_rate"]) == CRASH:
            assert t.state.name == "FAIL" and t.value is None, t
        else:
            assert t.state.name == "COMPLETE" and 0.0 < t.value < 1.0, t  # a val/logloss
    errors = list((tmp_path / "outputs" / "train" / "multiruns").glob("*/*/error.txt"))
    assert len(errors) == states(found)["FAIL"]
    assert all("dropout" in e.read_text().lower() for e in errors)


@pytest.mark.slow
def test_three_trial_sweep_one_crash_then_a_resumed_sweep_adds_up(tmp_path):
    """3 trials in one sweep, one FAIL; the same command again (same storage and study_name) adds 1."""
    res = sweep(tmp_path, 3)
    assert res.returncode == 0, res.stderr[-4000:]
    found = trials(tmp_path)
    assert states(found) == {"COMPLETE": 2, "FAIL": 1}, states(found)
    check_each_trial(found, tmp_path)
    res = sweep(tmp_path, 1)  # a killed sweep is picked up the same way
    assert res.returncode == 0, res.stderr[-4000:]
    found = trials(tmp_path)
    assert [t.number for t in found] == [0, 1, 2, 3]
    assert states(found) == {"COMPLETE": 3, "FAIL": 1}, states(found)
    check_each_trial(found, tmp_path)


def test_two_trial_sweep_goes_on_past_a_crash_and_resumes_from_its_storage(tmp_path):
    """The default run's variant: 2 trials (the second crashes), then 1 more from the same storage."""
    res = sweep(tmp_path, 2)
    assert res.returncode == 0, res.stderr[-4000:]
    found = trials(tmp_path)
    assert [t.state.name for t in found] == ["COMPLETE", "FAIL"]
    check_each_trial(found, tmp_path)
    res = sweep(tmp_path, 1)
    assert res.returncode == 0, res.stderr[-4000:]
    found = trials(tmp_path)
    assert [t.state.name for t in found] == ["COMPLETE", "FAIL", "COMPLETE"]
    check_each_trial(found, tmp_path)
    assert "Best value" in res.stdout + res.stderr


def test_a_trial_worse_than_the_median_is_pruned_while_complete_and_fail_hold(tmp_path):
    """COMPLETE, PRUNED, FAIL in one sweep, each checked against its own draw in the storage."""
    res = sweep(tmp_path, 3, PRUNE_TINY + PRUNE_SPACE)
    # the sweep went past the pruned trial 1 and ended at the failed trial 2, as max_failure_rate=0.0 asks
    assert res.returncode != 0 and "Invalid learning rate: -1.0" in res.stderr, res.stderr[-4000:]
    found = trials(tmp_path)
    assert [t.state.name for t in found] == ["COMPLETE", "PRUNED", "FAIL"], [(t.state.name, t.params) for t in found]
    by_lr = {float(t.params["model.optimizer.lr"]): t for t in found}
    done, pruned, failed = by_lr[GOOD_LR], by_lr[STILL_LR], by_lr[BAD_LR]
    # every epoch reported, and the value told is a val/logloss
    assert sorted(done.intermediate_values) == list(range(EPOCHS)) and 0.0 < done.value < 1.0, done
    # stopped at epoch 0 of 3, with its report kept, because it was worse than the completed trial there
    assert sorted(pruned.intermediate_values) == [0] and pruned.value is None, pruned
    assert pruned.intermediate_values[0] > done.intermediate_values[0]
    assert failed.intermediate_values == {} and failed.value is None, failed
    # a pruned trial is no crash: only the failed one left a traceback
    errors = list((tmp_path / "outputs" / "train" / "multiruns").glob("*/*/error.txt"))
    assert len(errors) == 1 and "learning rate" in errors[0].read_text().lower(), errors
    assert "Pruned trial 1" in res.stdout + res.stderr


def test_objective_is_the_named_metric_and_a_missing_name_says_which_exist():
    from omegaconf import OmegaConf

    from within.pipeline.config import ConfigError

    cfg = OmegaConf.create({"optimized_metric": "val/logloss"})
    assert objective_value(cfg, {"val/logloss": 0.2, "val/auc": 0.7}) == 0.2
    assert objective_value(OmegaConf.create({"optimized_metric": None}), {"val/logloss": 0.2}) is None
    with pytest.raises(ConfigError, match=r"optimized_metric: the run logged no 'val/loss'.*val/auc, val/logloss"):
        objective_value(OmegaConf.create({"optimized_metric": "val/loss"}), {"val/logloss": 0.2, "val/auc": 0.7})


def fake_trainer(epoch: int, metrics: dict[str, float]) -> SimpleNamespace:
    """What OptunaPruning reads of a Trainer, on one device (broadcast hands back rank 0's value)."""
    import torch

    return SimpleNamespace(sanity_checking=False, current_epoch=epoch, is_global_zero=True,
                           callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
                           strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))


def test_the_callback_reports_to_the_named_trial_and_stops_it_when_pruned(tmp_path):
    import optuna

    from within.lit.pruning import OptunaPruning

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    first, second = study.ask(), study.ask()
    cb = OptunaPruning(storage=storage, study_name="s", number=second.number,
                       pruner=optuna.pruners.ThresholdPruner(upper=0.5), monitor="val/logloss")
    cb.setup(fake_trainer(0, {}), None, "fit")
    assert cb.trial._trial_id == second._trial_id != first._trial_id
    cb.on_validation_end(fake_trainer(0, {"val/logloss": 0.3}), None)
    with pytest.raises(optuna.TrialPruned, match=r"trial 1 pruned at epoch 1 \(val/logloss=0.9"):
        cb.on_validation_end(fake_trainer(1, {"val/logloss": 0.9}), None)
    stored = optuna.load_study(study_name="s", storage=storage).trials[second.number]
    assert stored.intermediate_values == pytest.approx({0: 0.3, 1: 0.9}) and stored.state.name == "RUNNING"
    with pytest.raises(ValueError, match=r"optimized_metric: 'val/logloss' is not logged.*one of: val/auc, "
                                         r"or hydra.sweeper.pruner=null"):
        cb.on_validation_end(fake_trainer(2, {"val/auc": 0.7, "train/loss": 0.1}), None)


def test_pruner_options_compose_and_null_turns_pruning_off(tmp_path):
    import optuna
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    options = sorted(p.stem for p in (ROOT / "conf" / "hydra" / "sweeper" / "pruner").glob("*.yaml"))
    assert "median" in options
    for option in options:
        cfg = compose_cfg("train", ["hparams_search=optuna", f"hydra/sweeper/pruner={option}"], out_dir=tmp_path)
        assert isinstance(instantiate(cfg.hydra.sweeper.pruner), optuna.pruners.BasePruner), option
    cfg = compose_cfg("train", ["hparams_search=optuna"], out_dir=tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("PruningOptunaSweeper")
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"  # the default
    cfg = compose_cfg("train", ["hparams_search=optuna", "hydra.sweeper.pruner=null"], out_dir=tmp_path)
    assert cfg.hydra.sweeper.pruner is None


def test_the_sweeper_names_the_field_when_pruning_cannot_work():
    import optuna
    from hydra_plugins.within_optuna_sweeper._impl import PruningOptunaSweeperImpl

    args = dict(sampler=None, direction="minimize", study_name="s", n_trials=1, n_jobs=1, max_failure_rate=0.0,
                search_space=None, custom_search_space=None, params=None)
    with pytest.raises(ValueError, match=r"hydra.sweeper.pruner: pruning needs a storage.*hydra.sweeper.storage is None"):
        PruningOptunaSweeperImpl(pruner=optuna.pruners.MedianPruner(), storage=None, **args)
    with pytest.raises(ValueError, match=r"hydra.sweeper.pruner: .* is not an optuna pruner"):
        PruningOptunaSweeperImpl(pruner={"_target_": "optuna.pruners.MedianPruner"}, storage="sqlite://", **args)
    PruningOptunaSweeperImpl(pruner=None, storage=None, **args)  # no pruner: Hydra's sweeper as it is


@pytest.mark.parametrize("value", ["sqlite:////tmp/a b/optuna.db", "sqlite:////tmp/it's/x=1,2.db", "C:\\runs\\",
                                   "a\\'b"])
def test_a_trial_override_reads_back_as_the_value_it_quotes(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.within_optuna_sweeper._impl import quoted

    assert OverridesParser.create().parse_override(f"+optuna_trial.storage={quoted(value)}").value() == value


def test_a_job_named_a_trial_without_the_sweeper_says_what_is_missing(tmp_path):
    from omegaconf import open_dict

    from tests.conftest import compose_cfg
    from within.pipeline.config import ConfigError
    from within.pipeline.pruning import pruning_callbacks

    cfg = compose_cfg("train", ["hparams_search=optuna"], out_dir=tmp_path)
    assert pruning_callbacks(cfg) == []  # not a trial: nothing to report to
    with open_dict(cfg):
        cfg.optuna_trial = {"number": 0}
    with pytest.raises(ConfigError, match=r"optuna_trial: no study_name, storage; the pruning sweeper"):
        pruning_callbacks(cfg)
    with open_dict(cfg):
        cfg.optuna_trial = {"number": 0, "study_name": "s", "storage": "sqlite://"}
        cfg.optimized_metric = None
    with pytest.raises(ConfigError, match=r"optimized_metric: null, but the trial's pruner needs a metric"):
        pruning_callbacks(cfg)
