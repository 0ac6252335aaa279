"""MonitorCallback: validation predictions of a tiny Lightning module reach the PerformanceMonitor."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from within.lit.monitor import MonitorCallback
from within.monitoring.monitor import PerformanceMonitor

N_VAL = 256


class Rows(Dataset):
    def __init__(self, n: int, seed: int, weight: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        p = torch.sigmoid(self.x @ torch.tensor([1.0, -1.0, 0.5]) - 1.0)
        self.y = (torch.rand(n, generator=g) < p).float()
        self.groups = torch.randint(0, 4, (n, 1), generator=g)
        self.weight = weight

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"num": self.x[i], "label": self.y[i], "weight": torch.tensor(self.weight), "groups": self.groups[i]}


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch):
        return self.lin(batch["num"]).squeeze(-1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.binary_cross_entropy_with_logits(self(batch), batch["label"])

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _trainer(callback: MonitorCallback, epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=1)


def test_validation_predictions_reach_the_monitor():
    monitor = PerformanceMonitor(window_size=N_VAL)
    callback = MonitorCallback(monitor, segment_names=["account_id"])
    trainer = _trainer(callback, epochs=3)
    trainer.fit(Tiny(), DataLoader(Rows(512, 0), batch_size=64), DataLoader(Rows(N_VAL, 1), batch_size=64))
    counts = monitor.store.counts()
    assert counts["predictions"] == 3 * N_VAL and counts["labeled"] == 3 * N_VAL  # no sanity-check rows
    assert monitor.complete_windows == 3 and callback.last_report.window == 2
    assert "monitor/auc" in trainer.callback_metrics and "monitor/drift" in trainer.callback_metrics
    rows = monitor.store.rows(1, N_VAL)
    assert set(monitor.store.column("segment", "account_id", 1, N_VAL)[1]) == {"0", "1", "2", "3"}
    val = Rows(N_VAL, 1)
    assert np.array_equal(rows["actual"], val.y.numpy().astype(np.float64))


def test_aggregated_rows_are_refused():
    callback = MonitorCallback(PerformanceMonitor(window_size=N_VAL))
    with pytest.raises(ValueError, match="batch\\['weight'\\] is not all 1"):
        _trainer(callback, epochs=1).fit(Tiny(), DataLoader(Rows(64, 0), batch_size=32),
                                         DataLoader(Rows(64, 1, weight=3.0), batch_size=32))
