"""CrossModalAttention: self-attention across modality tokens, pooled by learned importances."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class CrossModalAttention(nn.Module):
    """Each modality vector becomes one token; tokens attend to each other; a weighted pool follows.

    Args:
        modality_dims: {modality name: width of its vector}, in token order.
        attention_heads: heads of the multi-head attention; must divide `attention_dim`.
        attention_dim: token width and output width.
        dropout: dropout on the attention weights.
        dp_compatible: use opacus' DPMultiheadAttention (per-sample gradients) instead of
            nn.MultiheadAttention.

    A learned [CLS] token is always present and never masked, so a row whose modalities are all
    missing still attends to something and pools to a finite vector. Missing modalities are
    masked out as keys (`key_padding_mask`) and get zero pooling weight. Learned parameters that
    are not weights of a standard layer sit in nn.Embedding tables indexed by zero, so Opacus
    has a per-sample gradient rule for every parameter.
    """

    def __init__(
        self,
        modality_dims: Mapping[str, int],
        attention_heads: int = 4,
        attention_dim: int = 64,
        dropout: float = 0.1,
        dp_compatible: bool = False,
    ) -> None:
        super().__init__()
        if not modality_dims:
            raise ValueError("modality_dims is empty; give {modality name: vector width} for at least one")
        if attention_heads < 1 or attention_dim % attention_heads:
            raise ValueError(
                f"attention_dim={attention_dim} must be divisible by attention_heads={attention_heads}; "
                "e.g. attention_dim=64 with attention_heads=4"
            )
        self.modalities = list(modality_dims)
        self.modality_dims = {m: int(d) for m, d in modality_dims.items()}
        self.attention_heads = int(attention_heads)
        self.attention_dim = int(attention_dim)
        self.dp_compatible = bool(dp_compatible)
        self.proj = nn.ModuleDict({m: nn.Linear(d, self.attention_dim) for m, d in self.modality_dims.items()})
        self.cls = nn.Embedding(1, self.attention_dim)
        nn.init.normal_(self.cls.weight, std=0.02)
        if self.dp_compatible:
            from opacus.layers import DPMultiheadAttention

            self.attn: nn.Module = DPMultiheadAttention(
                self.attention_dim, self.attention_heads, dropout=dropout, batch_first=True
            )
        else:
            self.attn = nn.MultiheadAttention(self.attention_dim, self.attention_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(self.attention_dim)
        # Importance logits for [CLS] + each modality; zeros = uniform pooling at the start.
        self.importance = nn.Embedding(1, len(self.modalities) + 1)
        nn.init.zeros_(self.importance.weight)
        self._last_weights: torch.Tensor | None = None

    def encode_modality(self, modality: str, data: torch.Tensor) -> torch.Tensor:
        """Project one modality's vectors [B, d_m] to tokens [B, attention_dim]."""
        if modality not in self.proj:
            raise KeyError(f"modality {modality!r} is not one of this attention's modalities {self.modalities}")
        return self.proj[modality](data)

    def forward(
        self,
        modalities: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """modalities {name: [B, d_m]}, masks {name: bool [B], True = present} -> [B, attention_dim]."""
        missing = [m for m in self.modalities if m not in modalities]
        if missing:
            raise KeyError(
                f"modalities is missing {missing}; pass every modality in {self.modalities} "
                "(mark absent rows with masks[name] = False instead of leaving the key out)"
            )
        first = modalities[self.modalities[0]]
        b = first.shape[0]
        zero = torch.zeros(b, dtype=torch.long, device=first.device)
        tokens = [self.cls(zero)] + [self.encode_modality(m, modalities[m]) for m in self.modalities]
        dtype = tokens[0].dtype
        for t in tokens[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        x = torch.stack([t.to(dtype) for t in tokens], dim=1)  # [B, M+1, D]
        present = torch.ones(b, len(tokens), dtype=torch.bool, device=first.device)
        if masks is not None:
            for j, m in enumerate(self.modalities, start=1):
                if m in masks and masks[m] is not None:
                    present[:, j] = masks[m].to(device=first.device, dtype=torch.bool)
        attended, weights = self.attn(x, x, x, key_padding_mask=~present, need_weights=True)
        h = self.norm(x + attended)
        logits = self.importance(zero).masked_fill(~present, float("-inf"))
        pool = torch.softmax(logits.float(), dim=1).to(h.dtype)  # [B, M+1]
        out = (pool.unsqueeze(-1) * h).sum(dim=1)
        # Modality-to-modality block, rows of missing modalities zeroed (their queries are unused).
        w = weights[:, 1:, 1:].detach().float() * present[:, 1:].unsqueeze(-1)
        self._last_weights = w
        return out

    def get_attention_weights(self) -> torch.Tensor:
        """The last forward's attention [B, M, M] (query modality x key modality), head-averaged.

        Rows sum to at most 1: the rest went to the [CLS] token. Missing modalities get 0 as keys
        and as queries.
        """
        if self._last_weights is None:
            raise RuntimeError("get_attention_weights() has no weights yet: call forward first")
        return self._last_weights

    def get_modality_importance(self) -> dict[str, float]:
        """The learned pooling weight of each modality (and [CLS]) with every modality present."""
        with torch.no_grad():
            p = torch.softmax(self.importance.weight[0].float(), dim=0)
        return {"cls": float(p[0]), **{m: float(p[j]) for j, m in enumerate(self.modalities, start=1)}}

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, attention_dim={self.attention_dim}, heads={self.attention_heads}"


__all__ = ["CrossModalAttention"]
