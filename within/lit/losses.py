"""The training losses: binomial log loss on logits, weighted by impressions, summed and per row.

Aggregated rows (clicks out of impressions) and one-impression rows share one code path. The
per-row form is DP-SGD's per-sample loss (within/lit/dp_module.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def binomial_logloss(logits: torch.Tensor, clicks: torch.Tensor, impressions: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -[c log p + (n - c) log(1 - p)]; equals BCE for 0/1 rows with n = 1."""
    rate = (clicks / impressions).clamp(0.0, 1.0)
    return (F.binary_cross_entropy_with_logits(logits, rate, reduction="none") * impressions).sum()


def row_losses(logits: torch.Tensor, clicks: torch.Tensor, impressions: torch.Tensor) -> torch.Tensor:
    """Per-row binomial log loss (the summand of `binomial_logloss`): the DP per-sample loss."""
    rate = (clicks / impressions).clamp(0.0, 1.0)
    return F.binary_cross_entropy_with_logits(logits, rate, reduction="none") * impressions


class RowLoss(nn.Module):
    """`row_losses` as a criterion with a `reduction` attribute, as Opacus' ghost-clipping loss wrapper needs."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, clicks: torch.Tensor, impressions: torch.Tensor) -> torch.Tensor:
        per = row_losses(logits, clicks, impressions)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()
