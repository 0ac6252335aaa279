"""The shared training runner: the recipe contract, a bundle that survives any post-fit step, loggers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CONF, FAST, compose_cfg
from within.pipeline.recipe import Recipe
from within.pipeline.train import build_recipe, run_train


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_option_targets_a_recipe(option, tmp_path):
    cfg = compose_cfg("train", [f"model={option}"], out_dir=tmp_path)
    assert cfg.model._target_.startswith("within.pipeline.recipes.")
    assert isinstance(build_recipe(cfg), Recipe)


def _status(run: Path) -> dict[str, dict]:
    return {row["step"]: row for row in json.loads((run / "report" / "postfit.json").read_text())["postfit"]}


def test_a_failing_step_is_recorded_and_the_run_ends_with_bundle_and_report(tmp_path, monkeypatch):
    from within.postfit.quantize import Quantize

    def broken(self, ctx):
        ctx.model.calibrator = "half-done"  # what a step leaves behind when it dies mid-way
        raise RuntimeError("quantize broke on purpose")

    monkeypatch.setattr(Quantize, "run", broken)
    run_train(compose_cfg("train", FAST, out_dir=tmp_path))
    status = _status(tmp_path)
    assert status["quantize"]["status"] == "failed"
    assert "quantize broke on purpose" in status["quantize"]["error"]
    assert status["export"]["status"] == "ok" and status["calibrate"]["status"] == "ok"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| `quantize` | failed |" in report and "quantize broke on purpose" in report
    from within import AdScorePredictor

    predictor = AdScorePredictor.load(tmp_path / "bundle")  # the calibrated model, not the half-done state
    assert predictor.calibrator is not None and predictor.calibrator != "half-done"
    saved = {r["step"]: r["status"] for r in predictor.metadata["postfit"]}
    assert saved["quantize"] == "failed"
    assert "test/auc" in json.loads((tmp_path / "report" / "metrics.json").read_text())


def test_postfit_strict_makes_a_failing_step_fatal(tmp_path, monkeypatch):
    from within.postfit.intervals import Intervals

    monkeypatch.setattr(Intervals, "run", lambda self, ctx: (_ for _ in ()).throw(ValueError("no intervals today")))
    with pytest.raises(ValueError, match="no intervals today"):
        run_train(compose_cfg("train", FAST + ["postfit_strict=true"], out_dir=tmp_path))
    assert (tmp_path / "bundle" / "metadata.json").is_file()  # written as soon as the fit ended


def test_the_bundle_is_written_whatever_postfit_lists(tmp_path):
    run_train(compose_cfg("train", FAST + ["postfit=[calibrate]"], out_dir=tmp_path))
    from within import AdScorePredictor

    predictor = AdScorePredictor.load(tmp_path / "bundle")
    assert predictor.calibrator is not None
    assert not (tmp_path / ".bundle.tmp").exists() and not (tmp_path / ".bundle.old").exists()


def test_an_unknown_step_fails_before_training(tmp_path):
    from within.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown step.*'calibrat'"):
        run_train(compose_cfg("train", FAST + ["postfit=[calibrat]"], out_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()


LOGGERS = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))


@pytest.mark.parametrize("logger", LOGGERS)
def test_every_logger_option_trains_a_batch(logger, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with caplog.at_level("INFO"):
        run_train(compose_cfg("train", [f"logger={logger}", "debug=fdr", "data.source.n=3000",
                                        "postfit=[calibrate]"], out_dir=tmp_path))
    assert (tmp_path / "bundle" / "metadata.json").is_file()
    if logger == "none":
        assert "LearningRateMonitor need one and are left out" in caplog.text
