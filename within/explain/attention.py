"""The cross-modal attention view: a cheap look at how the network mixes modalities.

NOT an attribution: attention weights say where each modality's token looked, not how much
a field moved the logit (Jain & Wallace, NAACL 2019, "Attention is not Explanation"); use
`explain` for that. It costs one forward pass, so it suits dashboards over many rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from within.explain.inputs import has_network, n_rows, processed

NOTE = ("attention weights, NOT an attribution: how much each modality token attended to the others, and the "
        "learned pooling weight of each modality; they do not add up to the logit")


def attention_view(model: Any, X: Any, batch_size: int = 4096) -> dict[str, Any]:
    """Mean cross-modal attention over the rows of X (raw rows or processed arrays).

    Returns {"note", "modalities", "mean_attention" [M][M] (query x key, rows sum to at most 1,
    the rest went to the [CLS] token), "per_row" [N][M][M], "pooling_weights" {cls, modality: w}}.
    """
    if not has_network(model):
        raise ValueError(f"attention_view: {type(model).__name__} has no network with attention; "
                         "it needs an AdPredictorNN model (use explain for other models)")
    net = model.net.eval()
    if getattr(net, "attention", None) is None:
        raise ValueError("attention_view: this network has no attention: it was built with use_cross_modal=false, "
                         f"or with one modality only ({list(net.modalities)})")
    arrays = processed(model, X)
    parts = []
    for start in range(0, n_rows(arrays), batch_size):
        batch = {k: torch.as_tensor(np.asarray(v)[start:start + batch_size]) for k, v in arrays.items()}
        parts.append(net.attention_weights(batch).double().numpy())
    per_row = np.concatenate(parts)
    return {
        "note": NOTE,
        "modalities": list(net.modalities),
        "mean_attention": per_row.mean(axis=0).tolist(),
        "per_row": per_row.tolist(),
        "pooling_weights": net.attention.get_modality_importance(),
    }
