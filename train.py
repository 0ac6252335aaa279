"""Train an ad-score model: python train.py [model=nn] [privacy=dp] [data=...] [key=value ...]"""
import hydra
from omegaconf import DictConfig

from within.pipeline.train import run_train_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_train_job(cfg)


if __name__ == "__main__":
    main()
