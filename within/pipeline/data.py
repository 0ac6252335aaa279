"""The run's datamodule from the config (or from a DataFrame given in Python)."""
from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_datamodule(cfg: DictConfig, source: Any = None, processor: Any = None) -> Any:
    """The configured datamodule; `source` (a DataFrame) replaces the configured data source, and a
    fitted `processor` replaces the one the datamodule would fit on train."""
    features = OmegaConf.to_container(cfg.features, resolve=True)
    # text_model group: the processor embeds text with it (hashing = the tokenizer)
    text_model = OmegaConf.to_container(cfg.text_model, resolve=True) if cfg.get("text_model") else None
    extra = {"processor": processor} if processor is not None else {}
    if source is None:
        return instantiate(cfg.data, features=features, seed=cfg.seed, text_model=text_model, **extra)
    node = OmegaConf.masked_copy(cfg.data, [k for k in cfg.data if k != "source"])
    return instantiate(node, source=source, features=features, seed=cfg.seed, text_model=text_model, **extra)
