"""Shared test helpers: compose Hydra configs into tmp_path, locate ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import within.pipeline  # noqa: F401  (registers resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = Path(os.environ.get("WITHIN_DATA_DIR", ROOT.parent / "shared" / "data"))

# Small, fast settings for pipeline tests: a 6k-row simulator world, one short epoch.
FAST_DATA = [
    "data.source.n=6000",
    "data.batch_size=512",
    "trainer.max_epochs=1",
    "extras.print_config=false",
]
FAST = [*FAST_DATA, "model.net.hidden_dims=[32]"]
FAST_ENSEMBLE = [*FAST_DATA, "model=ensemble", "model.member.net.hidden_dims=[32]"]


def compose_cfg(config_name: str = "train", overrides: list[str] | tuple = (), out_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(DATA_DIR)
        if out_dir is not None:
            cfg.paths.output_dir = str(out_dir)
            cfg.paths.log_dir = str(out_dir)
    return cfg


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not present at {DATA_DIR}")
    return DATA_DIR


def needs_data(*parts: str) -> Path:
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"dataset not present: {path}")
    return path
