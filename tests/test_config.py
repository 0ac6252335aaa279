"""Every option of every config group composes, validates and instantiates; typos fail naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from tests.conftest import CONF, DATA_DIR, compose_cfg
from within.features.spec import FeatureSpec
from within.pipeline.config import ConfigError, validate_config
from within.pipeline.loggers import instantiate_group

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("local", "hydra", "detect"))
REAL_DATA = {"ipinyou", "criteo", "avazu", "advertising", "kag_conversion", "csv", "telco"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data":
        overrides.append(f"features={option}" if (CONF / "features" / f"{option}.yaml").exists() else "features=synthetic")
    if group == "data" and option in REAL_DATA and not DATA_DIR.is_dir():
        pytest.skip("shared data not present")
    cfg = compose_cfg("train", overrides, out_dir=tmp_path)
    validate_config(cfg, "train")
    node = cfg.get(group)
    if group == "features":
        FeatureSpec.from_config(node)
    elif group == "data":
        dm = instantiate(node, features=OmegaConf.to_container(cfg.features, resolve=True), seed=0)
        assert dm.batch_size >= 1
    elif group == "trainer":
        needs_gpu = node.get("accelerator") == "gpu"
        if needs_gpu and not torch.cuda.is_available():
            pytest.skip("needs a GPU")
        trainer = instantiate(node, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == node.max_epochs
    elif group in ("callbacks", "logger"):
        built = instantiate_group(node)
        assert len(built) == len([k for k in (node or {}) if "_target_" in node[k]])
    elif group == "calibrator" and node is not None and "_target_" in node:
        assert hasattr(instantiate(node), "transform")
    elif group == "model":
        assert node._target_.startswith("within.")


def test_evaluate_config_composes(tmp_path):
    cfg = compose_cfg("evaluate", ["bundle=/nonexistent"], out_dir=tmp_path)
    validate_config(cfg, "evaluate")


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("trainer.max_epoch", 3, "trainer.max_epoch: Trainer has no parameter 'max_epoch'; did you mean 'max_epochs'?"),
        ("model.net.hiden_dims", [8], "model.net.hiden_dims: AdPredictorNN has no parameter 'hiden_dims'; did you mean 'hidden_dims'?"),
        ("trainer.max_epochs", "three", "trainer.max_epochs: expected int or null, got str 'three'"),
        ("seeed", 3, "config key 'seeed' is unknown; did you mean 'seed'?"),
        ("seed", "abc", "config key 'seed': expected int, got str 'abc'"),
        ("data.batch_size", 0, "data.batch_size: must be >= 1"),
    ],
)
def test_bad_config_names_the_key(path, value, message, tmp_path):
    cfg = compose_cfg("train", [], out_dir=tmp_path)
    with open_dict(cfg):
        OmegaConf.update(cfg, path, value, force_add=True)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, "train")
    assert message in str(err.value)


def test_cli_typo_is_rejected_by_hydra(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose_cfg("train", ["trainer.max_epoch=3"], out_dir=tmp_path)


def test_features_follow_data_choice(tmp_path):
    cfg = compose_cfg("train", [], out_dir=tmp_path)
    assert Path(CONF / "features" / "synthetic.yaml").exists()
    assert cfg.features.label == "clicked"


def test_a_user_error_ends_the_run_with_its_message_not_a_traceback(capsys, monkeypatch):
    from within.pipeline.console import exit_on_user_error

    def bad(_cfg):
        raise ConfigError("quantize.smooth_alpha: must be in [0, 1], got 2")

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(bad, None)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: quantize.smooth_alpha: must be in [0, 1], got 2\n"

    def bad_bundle(_cfg):
        from within.models.base import BundleError

        raise BundleError("/nowhere/metadata.json: not found")

    with pytest.raises(SystemExit):
        exit_on_user_error(bad_bundle, None)
    assert capsys.readouterr().err == "error: /nowhere/metadata.json: not found\n"

    def missing(_cfg):
        raise FileNotFoundError("ckpt_path: /nowhere/last.ckpt does not exist")

    with pytest.raises(SystemExit):
        exit_on_user_error(missing, None)
    assert capsys.readouterr().err == "error: ckpt_path: /nowhere/last.ckpt does not exist\n"

    def bug(_cfg):
        raise ValueError("a bug, not the user's input")

    with pytest.raises(ValueError, match="a bug"):  # other errors keep their traceback
        exit_on_user_error(bug, None)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        exit_on_user_error(bad, None)
    assert exit_on_user_error(lambda cfg: cfg + 1, 1) == 2

