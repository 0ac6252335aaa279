"""DPDDPStrategy: Lightning's DDP with Opacus' DPDDP wrapper, for privacy=dp on several devices."""
from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy
from torch import nn


class DPDDPStrategy(DDPStrategy):
    """DDP whose model wrapper is Opacus' DPDDP (broadcast at start, no gradient hooks).

    Torch DDP would all-reduce raw gradients during backward (and break ghost clipping's second
    backward); under DP the distributed DPOptimizer all-reduces the clipped, noised sum instead.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        return DPDDP(model)
