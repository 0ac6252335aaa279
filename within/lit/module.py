"""AdScoreModule: the LightningModule around any logits model (AdPredictorNN by default).

Loss is binomial cross-entropy on logits, weighted by impressions, so aggregated rows
(clicks out of impressions) and one-impression rows share one code path. A network with a
`regularization()` method (AdPredictorNN with a hierarchy) adds its penalty to the training loss;
the logged train/loss stays the log loss alone.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric, Metric

from within.calibration.metrics import auc as weighted_auc
from within.calibration.metrics import ece as equal_mass_ece
from within.lit.losses import binomial_logloss


class ScoreCollector(Metric):
    """Gathers (probability, clicks, impressions) across batches and DDP ranks for exact epoch metrics.

    torchmetrics' BinaryAUROC takes no sample weights, and aggregated ad rows need them.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.probs, self.clicks, self.impressions = CatMetric(), CatMetric(), CatMetric()

    def update(self, probs: torch.Tensor, clicks: torch.Tensor, impressions: torch.Tensor) -> None:
        self.probs.update(probs.float())
        self.clicks.update(clicks.float())
        self.impressions.update(impressions.float())

    def compute(self) -> dict[str, torch.Tensor]:
        p = self.probs.compute().double().cpu().numpy().reshape(-1)
        c = self.clicks.compute().double().cpu().numpy().reshape(-1)
        n = self.impressions.compute().double().cpu().numpy().reshape(-1)
        out = {"auc": float("nan"), "ece": float("nan")}
        if (c > 0).any() and (n > c).any():  # AUC needs both a click and a non-click
            out["auc"] = weighted_auc(p, c, weight=n)
        out["ece"] = equal_mass_ece(p, c, weight=n)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}

    def reset(self) -> None:
        super().reset()
        for m in (self.probs, self.clicks, self.impressions):
            m.reset()


class AdScoreModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        compile: bool = False,
    ) -> None:
        super().__init__()
        # partials are kept off the checkpoint: it must load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.net = torch.compile(net) if compile else net
        # keys carry a suffix: ModuleDict refuses "train", which is an nn.Module method
        self.split_loss = nn.ModuleDict({f"{s}_loss": MeanMetric() for s in ("train", "val", "test")})
        self.split_scores = nn.ModuleDict({f"{s}_scores": ScoreCollector() for s in ("val", "test")})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch)

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        logits = self(batch).float()
        clicks, impressions = batch["label"], batch["weight"]
        total = binomial_logloss(logits, clicks, impressions)
        n = impressions.sum()
        loss = total / n
        self.split_loss[f"{split}_loss"].update(loss.detach(), weight=n)
        if split == "train":
            # a network's prior penalty (per training impression; e.g. the hierarchy's random effects)
            reg = getattr(self.net, "regularization", None)
            penalty = reg() if callable(reg) else None
            if penalty is not None:
                loss = loss + penalty
        if split != "train":
            self.split_scores[f"{split}_scores"].update(torch.sigmoid(logits.detach()), clicks, impressions)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.log_train_loss()
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_loss_logged = False

    def log_train_loss(self) -> None:
        """Register the train/loss metric once per epoch. Lightning computes the metric (updated by
        every step) at the epoch's end; a self.log per step moved its result collection to the
        device every step, 1.2 ms of a 12 ms CPU step (docs/throughput.md)."""
        if not getattr(self, "_train_loss_logged", False):
            self.log("train/loss", self.split_loss["train_loss"], on_step=False, on_epoch=True, prog_bar=True)
            self._train_loss_logged = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        scores = self.split_scores[f"{split}_scores"].compute()
        self.log(f"{split}/logloss", self.split_loss[f"{split}_loss"].compute(), prog_bar=True, sync_dist=False)
        self.log(f"{split}/auc", scores["auc"].float(), prog_bar=True)
        self.log(f"{split}/ece", scores["ece"].float())
        self.split_loss[f"{split}_loss"].reset()
        self.split_scores[f"{split}_scores"].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch).float()

    def configure_optimizers(self) -> Any:
        from within.lit.optim import build_optimizer, sparse_parameters

        # sparse_embeddings=true: LazyAdam for the embedding tables beside the configured optimizer
        optimizer = build_optimizer(self.optimizer_factory, [p for p in self.parameters() if p.requires_grad],
                                    sparse_parameters(self))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval},
        }
