"""Train an ad-score model: python train.py [model=nn] [privacy=dp] [data=...] [key=value ...]"""
import hydra
from omegaconf import DictConfig

from within.pipeline.console import exit_on_user_error
from within.pipeline.train import run_train_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return exit_on_user_error(run_train_job, cfg)


if __name__ == "__main__":
    main()
