"""The `fairness` post-fit step through run_train: the simulator and KAG (python train.py ... postfit=[...])."""
from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, compose_cfg, needs_data
from within.pipeline.train import run_train

STEPS = ["postfit=[calibrate,fairness,export]", "export.onnx=false"]


def _check(out, fields):
    report = json.loads((out / "report" / "fairness.json").read_text())
    assert (out / "report" / "fairness.png").stat().st_size > 10_000
    assert report["fields"] == fields and set(report["before"]["fields"]) == set(fields)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert {"fairness/worst_group_ece", "fairness/worst_group_ece_after"} <= set(metrics)
    assert json.loads((out / "report" / "postfit.json").read_text())["fairness"]["fields"] == fields
    return report


@pytest.mark.slow
def test_fairness_step_on_the_simulator(tmp_path):
    run_train(compose_cfg("train", [*FAST, *STEPS], out_dir=tmp_path))
    report = _check(tmp_path, ["age_band", "gender"])
    assert report["calibration_split"] == "calib" and "ece_true" in report["before"]["overall"]


@pytest.mark.slow
@pytest.mark.data
def test_fairness_step_on_kag(tmp_path):
    needs_data("facebook_ad_conversions_KAG")
    run_train(compose_cfg("train", ["data=kag_conversion", "trainer.max_epochs=1", "extras.print_config=false",
                                    *STEPS], out_dir=tmp_path))
    report = _check(tmp_path, ["age", "gender"])
    assert report["calibration_split"] == "val"  # KAG has no calib split
    assert set(report["before"]["fields"]["gender"]["groups"]) == {"F", "M"}
