"""`EpochSeed`: a run resumed from last.ckpt draws the same dropout masks, word dropout and image flips
as one that never stopped.

Lightning's checkpoints hold the weights, optimizer and loop counters but not the random number
generators, and saving them is not enough: between the checkpoint and the next epoch's first batch
an uninterrupted run creates the epoch's data-loader iterator (one draw from the global generator),
while a resumed run creates it before any hook could restore the state (measured: the restored
state was one draw behind at batch 0). So the generators are re-seeded at each epoch's first batch
from (seed, epoch, rank), the same rule AdDataModule uses for the shuffle order: both runs then draw
the same numbers from there on, and the checkpoint needs nothing extra.
"""
from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed for one epoch on one rank (different ranks get different dropout masks)."""
    return int(np.random.SeedSequence([int(seed), 104_729, int(epoch), int(rank)]).generate_state(1)[0])


class EpochSeed(Callback):
    """Re-seeds torch (CPU and CUDA), NumPy and Python at the first training batch of every epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx != 0:
            return
        s = epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank)
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)
