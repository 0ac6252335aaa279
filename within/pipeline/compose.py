"""Compose the run config from Python (benchmarks, notebooks, the AdScorePredictor facade) as train.py does."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from within.pipeline.config import project_root, register_resolvers

CONF_DIR = Path(project_root()) / "conf"


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                   data_dir: str | Path | None = None, config_name: str = "train") -> Any:
    """conf/<config_name>.yaml plus `overrides`, composed as `train.py` would (HydraConfig set), for
    running `run_train` from Python. `output_dir` becomes the run directory."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(CONF_DIR.parent)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
        if output_dir is not None:
            cfg.paths.output_dir = cfg.paths.log_dir = str(output_dir)
    return cfg
