"""MonitorCallback: feeds each validation batch's predictions and labels to a PerformanceMonitor and
checks for drift at the end of every validation epoch.

The module's validation_step returns nothing, so the callback scores the batch itself (one more
forward pass, in eval mode, without gradients). Group columns of the batch (`batch["groups"]`)
become segments when `segment_names` names them. Aggregated rows (impression weight != 1) are not
per-prediction outcomes and are refused.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from within.monitoring.monitor import PerformanceMonitor


class MonitorCallback(L.Callback):
    """Validation predictions -> `monitor`; `monitor/<metric>` and `monitor/drift` logged per epoch."""

    def __init__(self, monitor: PerformanceMonitor, segment_names: Sequence[str] = ()) -> None:
        self.monitor = monitor
        self.segment_names = list(segment_names)
        self.last_report: Any = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        weight = batch.get("weight")
        if weight is not None and not torch.all(weight == 1):
            raise ValueError("MonitorCallback: batch['weight'] is not all 1 (aggregated rows); the monitor "
                             "logs one 0/1 outcome per prediction, so use row-level data")
        with torch.no_grad():
            p = torch.sigmoid(pl_module(batch).float()).cpu().numpy().astype(np.float64)
        y = batch["label"].detach().cpu().numpy().astype(np.float64)
        segments = None
        if self.segment_names:
            groups = batch["groups"].detach().cpu().numpy()
            if groups.shape[1] < len(self.segment_names):
                raise ValueError(f"MonitorCallback.segment_names: {len(self.segment_names)} names for "
                                 f"{groups.shape[1]} group columns in the batch")
            segments = {name: groups[:, j].tolist() for j, name in enumerate(self.segment_names)}
        self.monitor.log_prediction(p, y, segment=segments)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        current = self.monitor.get_current_metrics()
        for name in self.monitor.metrics:
            value = current.get(name)
            if value is not None and np.isfinite(value):
                pl_module.log(f"monitor/{name}", float(value))
        self.last_report = self.monitor.detect_drift()
        pl_module.log("monitor/drift", float(self.last_report.drifted))
