"""hparams_search=optuna end to end: `train.py -m` in a subprocess on a tiny simulator world.

The search space is one parameter, model.net.dropout_rate in {0.0, 1.5}; 1.5 is not a probability,
so a trial that draws it raises while its network is built (the crash on purpose). Optuna's
RandomSampler with seed 10 draws 0.0, 1.5, 0.0 for the first three trials (a restarted sweep starts
the same sequence again), so the counts below are known; each trial's state is also checked against
its own draw. Everything is read back from the study's SQLite storage, not from the logs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

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


def sweep(tmp_path: Path, n_trials: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WITHIN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna",
                           f"hydra.sweeper.n_trials={n_trials}", *TINY, *SPACE],
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


def test_objective_is_the_named_metric_and_a_missing_name_says_which_exist():
    from omegaconf import OmegaConf

    from within.pipeline.config import ConfigError

    cfg = OmegaConf.create({"optimized_metric": "val/logloss"})
    assert objective_value(cfg, {"val/logloss": 0.2, "val/auc": 0.7}) == 0.2
    assert objective_value(OmegaConf.create({"optimized_metric": None}), {"val/logloss": 0.2}) is None
    with pytest.raises(ConfigError, match=r"optimized_metric: the run logged no 'val/loss'.*val/auc, val/logloss"):
        objective_value(OmegaConf.create({"optimized_metric": "val/loss"}), {"val/logloss": 0.2, "val/auc": 0.7})
