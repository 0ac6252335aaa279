"""Rows to explain and reference rows, as raw frames or processed AdBatch arrays.

A model is anything with `predict_logits(X)` and a feature spec (`model.spec`, or
`model.processor.spec`); a network model also has `processor` and `net`. Nothing here imports a
model class, so renaming the inference classes changes nothing here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from within.features.spec import FeatureSpec

# Deduplicated AdBatch arrays (FeatureProcessor.transform(..., dedupe_images=True)) -> full arrays.
_TABLES = {"image": ("image_table", "image_index"), "text_emb": ("text_emb_table", "text_emb_index")}


def spec_of(model: Any) -> FeatureSpec:
    spec = getattr(model, "spec", None)
    if spec is None:
        spec = getattr(getattr(model, "processor", None), "spec", None)
    if spec is None:
        raise TypeError(f"explain: {type(model).__name__} has no feature spec (.spec or .processor.spec); "
                        "explain a fitted model loaded from a bundle")
    return spec


def has_network(model: Any) -> bool:
    """A model whose logit is one AdPredictorNN over processed inputs (gradient attributions apply)."""
    net = getattr(model, "net", None)
    return net is not None and callable(getattr(net, "embed_inputs", None)) and getattr(model, "processor", None) is not None


def is_processed(X: Any) -> bool:
    """True for AdBatch arrays ({"mask_tabular": ..., "num": ...}), False for raw rows."""
    return isinstance(X, Mapping) and "mask_tabular" in X and all(isinstance(v, np.ndarray) for v in X.values())


def processed(model: Any, X: Any) -> dict[str, np.ndarray]:
    """AdBatch arrays for raw rows (through the model's processor), or the given arrays expanded."""
    if not is_processed(X):
        return model.processor.transform(X)
    out = {k: v for k, v in X.items() if not any(k in pair for pair in _TABLES.values())}
    for key, (table, index) in _TABLES.items():
        if table in X:
            out[key] = np.asarray(X[table])[np.asarray(X[index])]
    return out


def n_rows(arrays: Mapping[str, np.ndarray]) -> int:
    return len(arrays["mask_tabular"])


def take(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[idx] for k, v in arrays.items()}


def raw_frame(model: Any, X: Any, what: str) -> pd.DataFrame:
    """Raw rows as a DataFrame; processed arrays are refused (they cannot be mapped back to field values)."""
    if is_processed(X):
        raise ValueError(f"explain: {what} must be raw rows (a DataFrame, a record dict or a list of dicts) for "
                         "method='permutation'; processed arrays cannot be turned back into field values")
    return spec_of(model).records_to_frame(X).reset_index(drop=True)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Up to `size` row positions out of n, sorted, drawn without replacement."""
    if size < 1:
        raise ValueError(f"background_size must be >= 1, got {size}")
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
