"""Attributions for a network model: shap's GradientExplainer (expected gradients, Erion et al.
2021) over the network's embedded inputs, summed back to raw fields.

Gradients with respect to integer ids do not exist, so the explainer works past the lookups
(`AdPredictorNN.embed_inputs`): category embeddings, numeric columns, per-field text vectors,
pixels and the modality masks, all float. The first-order (wide) term is a sum of one scalar per
category value (as are a hierarchy's random-effect offsets), so its attribution is computed exactly, value minus its mean over the reference,
and only the rest of the network goes through the sampler. Expected gradients add up to
logit - mean reference logit in expectation; a row's remaining Monte Carlo error is its
`additivity_gap`, which shrinks like 1 / sqrt(nsamples).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from within.explain.explanation import Explanation
from within.explain.fields import FieldLayout, field_modalities
from within.explain.inputs import n_rows, processed, sample_rows, spec_of, take

NOTE = ("expected gradients over embedded inputs (shap.GradientExplainer); the first-order term is exact; "
        "additivity holds up to Monte Carlo error (additivity_gap)")


ADDITIVE = ("wide", "hierarchy")  # embedded inputs the logit adds as they are: attributed exactly


class _DeepLogit(nn.Module):
    """The network without its wide term, on all embedded inputs flattened into one [B, D] tensor:
    shap runs one backward pass per input tensor, so one tensor is one pass instead of five."""

    def __init__(self, net: nn.Module, example: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.keys = [k for k in example if k not in ADDITIVE]
        self.shapes = [tuple(example[k].shape[1:]) for k in self.keys]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def flatten(self, embedded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([embedded[k].reshape(len(embedded[k]), -1) for k in self.keys], dim=1)

    def unflatten(self, flat: Any) -> dict[str, Any]:
        parts = flat.split(self.sizes, dim=1) if isinstance(flat, torch.Tensor) else np.split(
            flat, np.cumsum(self.sizes)[:-1], axis=1)
        return {k: p.reshape(len(p), *s) for k, p, s in zip(self.keys, parts, self.shapes)}

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        return self.net.forward_embedded(self.unflatten(flat)).unsqueeze(1)


@torch.no_grad()
def embed(net: nn.Module, arrays: Mapping[str, np.ndarray], batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """`net.embed_inputs` over AdBatch arrays, in chunks; float tensors on the CPU."""
    parts: list[dict[str, torch.Tensor]] = []
    n = n_rows(arrays)
    for start in range(0, n, batch_size):
        batch = {k: torch.as_tensor(np.asarray(v)[start:start + batch_size]) for k, v in arrays.items()}
        parts.append({k: v.detach().float().cpu() for k, v in net.embed_inputs(batch).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def embedded_logits(net: nn.Module, embedded: Mapping[str, torch.Tensor], batch_size: int = 4096) -> np.ndarray:
    n = len(next(iter(embedded.values())))
    out = [net.forward_embedded({k: v[s:s + batch_size] for k, v in embedded.items()}).double().numpy()
           for s in range(0, n, batch_size)]
    return np.concatenate(out)


def explain_network(
    model: Any,
    X: Any,
    reference: Any,
    nsamples: int = 200,
    background_size: int = 200,
    seed: int = 0,
    batch_size: int = 200,
) -> Explanation:
    """Attribute each row's logit to its raw fields (see the module docstring).

    X, reference: raw rows (DataFrame, record dict, list of dicts) or processed AdBatch arrays.
    At most `background_size` reference rows are the baseline distribution; `nsamples` is the
    number of (reference row, path point) draws per explained row.
    """
    import shap

    if nsamples < 1:
        raise ValueError(f"explain: nsamples must be >= 1, got {nsamples}")
    net = model.net.eval()
    rows = processed(model, X)
    ref = processed(model, reference)
    ref = take(ref, sample_rows(n_rows(ref), background_size, seed))
    emb_rows, emb_ref = embed(net, rows), embed(net, ref)
    deep = _DeepLogit(net, emb_rows)
    # shap reseeds numpy's global generator; keep the caller's stream as it was
    state = np.random.get_state()
    try:
        with torch.enable_grad():
            explainer = shap.GradientExplainer(deep, deep.flatten(emb_ref), batch_size=batch_size)
            phi = explainer.shap_values(deep.flatten(emb_rows), nsamples=nsamples, rseed=seed)
    finally:
        np.random.set_state(state)
    attributions = deep.unflatten(np.asarray(phi)[..., 0])
    for key in ADDITIVE:  # additive in its inputs: value minus its reference mean, exactly
        if key in emb_rows:
            attributions[key] = (emb_rows[key] - emb_ref[key].mean(dim=0)).double().numpy()
    layout = FieldLayout.of(model.processor, net)
    explanation = Explanation(
        values=layout.to_fields(attributions),
        feature_names=layout.names,
        modalities=field_modalities(spec_of(model), layout.names),
        base_value=float(embedded_logits(net, emb_ref).mean()),
        logits=embedded_logits(net, emb_rows),
        method="gradient",
        method_note=NOTE,
    )
    return explanation.drop_zero_presence()
