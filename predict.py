"""Score a file with a bundle: python predict.py bundle=PATH input=file.parquet output=scores.parquet [intervals=true]"""
import hydra
from omegaconf import DictConfig

from within.pipeline.console import exit_on_user_error
from within.serve.batch import run_predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> dict:
    return exit_on_user_error(run_predict, cfg)


if __name__ == "__main__":
    main()
