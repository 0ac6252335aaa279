"""Score a saved bundle on any data config: python evaluate.py bundle=PATH [data=...] [split=test]"""
import hydra
from omegaconf import DictConfig

from within.pipeline.console import exit_on_user_error
from within.pipeline.evaluate import run_evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict[str, float]:
    return exit_on_user_error(run_evaluate, cfg)


if __name__ == "__main__":
    main()
