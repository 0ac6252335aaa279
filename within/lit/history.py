"""MetricHistory: keeps epoch-level metrics in memory so the report can draw the training curve
whatever loggers (or none) the run uses.

A row is taken at the train epoch's end: by then the epoch's validation has run and its train
metrics are aggregated. (At `on_validation_epoch_end`, which Lightning runs before the module's own
hook and before the train epoch ends, each row held the previous epoch's values.)"""
from __future__ import annotations

import lightning as L


class MetricHistory(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": float(trainer.current_epoch)}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/", "val/")):
                row[key] = float(value)
        self.rows.append(row)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))
