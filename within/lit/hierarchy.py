"""HierarchyPrior: the Lightning side of `within.nn.hierarchy.HierarchicalEffects`.

- At fit start it tells each layer the training impressions, so the prior's penalty is weighted per
  impression from the first step (the layer otherwise uses the impressions seen so far).
- After each training epoch it runs the layer's empirical-Bayes step (`update_prior`), with the
  Fisher information summed across ranks under DDP so every rank keeps the same tau, and logs
  `train/hierarchy_tau/<field>`.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from within.nn.hierarchy import HierarchicalEffects


def _layers(module: torch.nn.Module) -> list[HierarchicalEffects]:
    return [m for m in module.modules() if isinstance(m, HierarchicalEffects)]


def train_impressions(trainer: pl.Trainer) -> float | None:
    """Total impressions of the datamodule's train split (rows when unweighted), or None if unknown."""
    datasets = getattr(getattr(trainer, "datamodule", None), "datasets", None) or {}
    train = datasets.get("train")
    tensors = getattr(train, "tensors", None)
    if not tensors:
        return None
    if "weight" in tensors:
        return float(tensors["weight"].double().sum())
    return float(len(train))


class HierarchyPrior(Callback):
    """Sets each HierarchicalEffects layer's training size and runs its empirical-Bayes step per epoch."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = _layers(pl_module)
        if not layers:
            raise ValueError("HierarchyPrior: the module has no HierarchicalEffects layer; set model.net.hierarchy "
                             "(e.g. [account_id, campaign_id]) or drop the callback")
        n = train_impressions(trainer)
        for layer in layers:
            if n:
                layer.set_rows(n)
            layer.info.zero_()
            layer.rows_seen.zero_()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in _layers(pl_module):
            info = layer.info
            if trainer.world_size > 1:
                info = trainer.strategy.reduce(info.clone(), reduce_op="sum")
            taus = layer.update_prior(info)
            for field, tau in taus.items():
                pl_module.log(f"train/hierarchy_tau/{field}", tau, on_step=False, on_epoch=True, sync_dist=False)


__all__ = ["HierarchyPrior", "train_impressions"]
