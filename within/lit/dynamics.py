"""Lightning callbacks that drive the training-dynamics layers in `within.nn`.

- `NoiseAnnealing` steps every `QuantumNoiseLayer`'s schedule (Neelakantan et al. 2015 anneal
  their noise the same way).
- `AdaptiveDropoutTuner` feeds every `AdaptiveDropout` the train/val gap and per-group gradient
  norms at each validation, per the rule in `AdaptiveDropout.update_rate`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from within.nn.dropout import AdaptiveDropout
from within.nn.noise import QuantumNoiseLayer


def _layers(module: torch.nn.Module, kind: type) -> list:
    return [m for m in module.modules() if isinstance(m, kind)]


class NoiseAnnealing(Callback):
    """After each training batch, set every QuantumNoiseLayer's level from `trainer.global_step`.

    Layers built with `total_steps=None` get `trainer.estimated_stepping_batches` at fit start.
    Logs `train/noise_level`: the mean level over the layers (they share a level unless they
    were built with different intensities).
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in _layers(pl_module, QuantumNoiseLayer):
            if layer.total_steps is None:
                total = trainer.estimated_stepping_batches
                if not math.isfinite(total) or total < 1:
                    raise ValueError(
                        f"NoiseAnnealing: the trainer can't estimate its step count ({total}); "
                        "set max_steps on the trainer or total_steps on the QuantumNoiseLayer"
                    )
                layer.set_total_steps(int(total))
            layer.update_schedule(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        levels = [layer.update_schedule(trainer.global_step) for layer in _layers(pl_module, QuantumNoiseLayer)]
        if levels:
            pl_module.log("train/noise_level", sum(levels) / len(levels), on_step=True, on_epoch=False)


class AdaptiveDropoutTuner(Callback):
    """At each validation end, call `update_rate` on every AdaptiveDropout in the module.

    Train loss: the mean of the `loss` that `training_step` returned over the batches since the
    last validation (taken from the step outputs, because Lightning runs the epoch-end
    validation before `train/loss` is aggregated); if the step returned no loss, the
    callback falls back to `trainer.callback_metrics[train_key]`. Validation loss:
    `trainer.callback_metrics[val_key]` (default `val/logloss`), read in `on_validation_end`,
    when this epoch's value has been aggregated. With neither loss, only gradients steer.

    Gradient norms: after each backward, for each group name (text / image / tabular), the L2
    norm of the gradients of all parameters whose qualified name has that name as a `.`/`_`-separated token (e.g.
    `extractor.text_encoder.embed.weight` -> text; `context_attn` is not text). Groups with no such parameters get no
    noise signal. Logs `train/dropout_<group>` at each train epoch end (suffixed `_<i>` when
    the module holds several AdaptiveDropout layers).
    """

    def __init__(self, train_key: str = "train/loss", val_key: str = "val/logloss") -> None:
        self.train_key = train_key
        self.val_key = val_key
        self._loss_sum = 0.0
        self._loss_count = 0
        self._grad_norms: dict[str, list[float]] = {}

    def _groups(self, pl_module: pl.LightningModule) -> Sequence[str]:
        names: list[str] = []
        for layer in _layers(pl_module, AdaptiveDropout):
            names.extend(g for g in layer.groups if g not in names)
        return names

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._loss_sum += float(loss.detach())
            self._loss_count += 1

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = self._groups(pl_module)
        if not groups:
            return
        sq: dict[str, list[torch.Tensor]] = {}
        for name, param in pl_module.named_parameters():
            if param.grad is None:
                continue
            tokens = set(re.split(r"[._]", name))
            for g in groups:
                if g in tokens:
                    sq.setdefault(g, []).append(param.grad.detach().float().pow(2).sum())
        if not sq:
            return
        # One device->host copy per step rather than one per parameter.
        totals = torch.stack([torch.stack(v).sum() for v in sq.values()]).sqrt().tolist()
        for g, norm in zip(sq, totals):
            self._grad_norms.setdefault(g, []).append(norm)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: callback_metrics only hold this epoch's val loss after it.
        if trainer.sanity_checking:
            return
        layers = _layers(pl_module, AdaptiveDropout)
        if not layers:
            return
        metrics = trainer.callback_metrics
        train_loss = self._loss_sum / self._loss_count if self._loss_count else None
        if train_loss is None and self.train_key in metrics:
            train_loss = float(metrics[self.train_key])
        val_loss = float(metrics[self.val_key]) if self.val_key in metrics else None
        if train_loss is None or val_loss is None:
            train_loss = val_loss = None
        for layer in layers:
            grads = {g: v for g, v in self._grad_norms.items() if g in layer.groups}
            layer.update_rate(grads or None, train_loss=train_loss, val_loss=val_loss)
        self._loss_sum, self._loss_count = 0.0, 0
        self._grad_norms = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning forbids self.log in on_validation_end; the epoch end runs right after it.
        layers = _layers(pl_module, AdaptiveDropout)
        for i, layer in enumerate(layers):
            suffix = "" if len(layers) == 1 else f"_{i}"
            for g, r in layer.get_current_rate().items():
                pl_module.log(f"train/dropout_{g}{suffix}", r)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self._loss_sum, "loss_count": self._loss_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loss_sum = float(state_dict["loss_sum"])
        self._loss_count = int(state_dict["loss_count"])
