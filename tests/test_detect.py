"""detect.py: every detect config option composes and validates, bad settings fail naming the key,
and runs on the simulator and on NAB write their outputs and print the run directory last."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from tests.conftest import DATA_DIR, ROOT, needs_data
from within.models.anomaly import AnomalyDetector
from within.pipeline.config import ConfigError
from within.pipeline.detect import nab_relative, run_detect, validate_detect_config

DETECT = ROOT / "conf" / "detect"
DATA = sorted(p.stem for p in (DETECT / "data").glob("*.yaml"))
DETECTORS = sorted(p.stem for p in (DETECT / "detector").glob("*.yaml"))
# small and fast: 6 accounts, 80 days
SMALL_SIM = ["+data.world.n_accounts=6", "data.world.seed=3", "data.performance.days=80",
             "data.performance.n_anomalies=3", "+data.performance.pilot_rows=30000"]


def compose_detect(overrides: list[str], out_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(DETECT), version_base="1.3"):
        cfg = compose("detect", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(DATA_DIR)
        cfg.paths.output_dir = str(out_dir)
    return cfg


CASES = [(d, k) for d in DATA for k in DETECTORS]


@pytest.mark.parametrize("data, detector", CASES, ids=[f"data={d},detector={k}" for d, k in CASES])
def test_every_detect_option_composes_and_validates(data, detector, tmp_path):
    overrides = [f"data={data}", f"detector={detector}"] + (["data.path=/some/file.csv"] if data == "csv" else [])
    cfg = compose_detect(overrides, tmp_path)
    validate_detect_config(cfg)
    node = OmegaConf.to_container(cfg.detector, resolve=True)
    assert node.pop("_target_") == "within.models.anomaly.AnomalyDetector"
    assert AnomalyDetector(**node).detection_method == detector


@pytest.mark.parametrize("override, message", [
    ("detector.sensitivity=2", "detector.sensitivity: must be in (0, 1) (higher flags more), got 2"),
    ("+detector.sensitivty=0.9", "detector.sensitivty: AnomalyDetector has no parameter 'sensitivty'; did you mean 'sensitivity'?"),
    ("data.kind=parquet", "data.kind: must be one of ['nab', 'simulator', 'csv'], got 'parquet'"),
    ("+seeed=3", "config key 'seeed' is unknown; did you mean 'seed'?"),
])
def test_bad_setting_fails_before_work_naming_the_key(override, message, tmp_path):
    cfg = compose_detect([override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_detect_config(cfg)
    assert message in str(err.value)


def test_bad_nab_relative_setting_names_the_key(tmp_path):
    cfg = compose_detect(["data=nab_adexchange", "data.relative.cooldown=-1"], tmp_path)
    with pytest.raises(ConfigError, match="data.relative.cooldown: must be a positive fraction"):
        validate_detect_config(cfg)


def test_nab_relative_settings_scale_with_the_probationary_period():
    rel = {"baseline": "expanding", "min_history": 0.5, "refresh": 0.02, "refit_every": 0.1, "cooldown": 0.25}
    got = nab_relative(rel, 1624)  # probation 243 rows
    assert got == {"baseline_window": 1624, "min_history": 122, "refresh": 5, "refit_every": 24, "cooldown": 61}
    assert nab_relative({"baseline": 2.0}, 1624)["baseline_window"] == 486


def test_detect_on_the_simulator_writes_outputs(tmp_path, capsys):
    cfg = compose_detect(SMALL_SIM, tmp_path)
    metrics = run_detect(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(tmp_path)
    for name in ("anomalies.json", "anomalies.csv", "metrics.json", "detections.png", "alerts.jsonl",
                 "labelled_anomalies.csv"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["events"]["labelled"] == 3 and 0.0 <= saved["events"]["f1"] <= 1.0
    assert metrics["anomalies"] == len(json.loads((tmp_path / "anomalies.json").read_text()))
    first = json.loads((tmp_path / "anomalies.json").read_text())[0]
    assert "root_cause" in first["explanation"] and first["direction"] in ("positive", "negative")


def test_detect_on_nab_adexchange_scores_all_profiles(tmp_path, capsys):
    needs_data("nab_realAdExchange", "exchange-2_cpc_results.csv")
    cfg = compose_detect(["data=nab_adexchange", "detector=stl_robust_z"], tmp_path)
    metrics = run_detect(cfg)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path)
    assert set(metrics["nab"]) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    std = metrics["nab"]["standard"]
    assert len(std["files"]) == 6 and sum(f["windows"] for f in std["files"]) == 14
    assert (tmp_path / "detections.png").is_file() and (tmp_path / "anomalies.csv").is_file()


@pytest.mark.slow
def test_detect_py_command_line(tmp_path):
    """The entry point itself, as a user runs it (a subprocess: Hydra owns the process)."""
    out = subprocess.run([sys.executable, "detect.py", *SMALL_SIM, f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path)
    bad = subprocess.run([sys.executable, "detect.py", "detector.sensitivity=2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=False)
    assert bad.returncode == 2 and "error: detector.sensitivity: must be in (0, 1)" in bad.stderr
