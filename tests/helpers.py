"""Test-only callbacks, referenced from configs by _target_."""
from __future__ import annotations

import lightning as L


class CrashAtEpochEnd(L.Callback):
    """Simulates a pre-empted job: dies at the end of `epoch`, after last.ckpt is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")
