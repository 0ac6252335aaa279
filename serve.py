"""Serve a bundle over HTTP: python serve.py bundle=PATH [port=8000] [max_batch=1024] [key=value ...]"""
import hydra
from omegaconf import DictConfig

from within.pipeline.console import exit_on_user_error
from within.serve import run_server


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run_server, cfg)


if __name__ == "__main__":
    main()
