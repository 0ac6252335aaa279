"""Detect anomalies: python detect.py [data=simulator|nab_adexchange|nab_tuning|csv] [detector=stl_robust_z|...]"""
import hydra
from omegaconf import DictConfig

from within.pipeline.console import exit_on_user_error
from within.pipeline.detect import run_detect


@hydra.main(version_base="1.3", config_path="conf/detect", config_name="detect")
def main(cfg: DictConfig) -> dict:
    return exit_on_user_error(run_detect, cfg)


if __name__ == "__main__":
    main()
