"""Loggers and callbacks from the config groups `logger:` and `callbacks:` (and a sweep trial's pruning).

W&B: a run's id is saved in its run directory (`wandb_run_id.txt`); a run resumed from a checkpoint
reuses the id saved beside that checkpoint's run, so its curves continue in one W&B run. A new run's
id is derived from its run directory's path, so every DDP rank and a requeued cluster job (same run
directory, ckpt_path=auto) agree on it without talking to each other; only rank 0 writes the file.
Every run ends with `wandb.finish()`, so one crashed job in a sweep does not hang the next. With `logger=none`, callbacks that need a logger are dropped with a notice.
"""
from __future__ import annotations

import hashlib
import logging
import string
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb_run_id.txt"
# Lightning callbacks that refuse to run without a logger
NEEDS_LOGGER = ("LearningRateMonitor", "DeviceStatsMonitor")


def instantiate_group(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(sub) for sub in node.values() if isinstance(sub, DictConfig) and "_target_" in sub]


def wandb_run_id(ckpt_path: str | None, out_dir: Path) -> str:
    """The W&B run id of the run being resumed, or the one saved in this run directory, or the one
    derived from this run directory's absolute path (8 lowercase letters and digits, W&B's own shape)."""
    if ckpt_path:
        saved = Path(ckpt_path).resolve().parents[1] / WANDB_ID_FILE
        if saved.is_file():
            return saved.read_text().strip()
    saved = out_dir / WANDB_ID_FILE
    if saved.is_file():
        return saved.read_text().strip()
    return run_dir_id(out_dir)


def run_dir_id(out_dir: Path, k: int = 8) -> str:
    """A stable id for a run directory: base-36 digits of the SHA-256 of its absolute path. Run
    directories carry their start time to the second, so two runs share one only if they share a path."""
    alphabet = string.digits + string.ascii_lowercase
    n = int.from_bytes(hashlib.sha256(str(Path(out_dir).resolve()).encode()).digest(), "big")
    chars = []
    for _ in range(k):
        n, r = divmod(n, 36)
        chars.append(alphabet[r])
    return "".join(chars)


def build_loggers(cfg: DictConfig, out_dir: Path, ckpt_path: str | None) -> list[Any]:
    if cfg.get("logger") and "wandb" in cfg.logger:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        run_id = wandb_run_id(ckpt_path, out_dir)
        if getattr(rank_zero_only, "rank", 0) == 0:  # the other ranks derive the same id
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / WANDB_ID_FILE).write_text(run_id)
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"
    return instantiate_group(cfg.get("logger"))


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[Any]:
    """The `callbacks:` group, plus the pruning callback when the job is a trial of a pruning sweep
    (within/pipeline/pruning.py); without a logger, those that need one are left out (and said so)."""
    from within.pipeline.pruning import pruning_callbacks

    callbacks = instantiate_group(cfg.get("callbacks")) + pruning_callbacks(cfg)
    if has_logger:
        return callbacks
    dropped = [type(c).__name__ for c in callbacks if type(c).__name__ in NEEDS_LOGGER]
    if dropped:
        log.info("no logger (logger=none): callbacks %s need one and are left out", ", ".join(dropped))
    return [c for c in callbacks if type(c).__name__ not in NEEDS_LOGGER]


def close_loggers(loggers: list[Any]) -> None:
    """Flush every logger and always finish the W&B run."""
    for lg in loggers:
        lg.save()
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
