"""The two calls the user-facing model and the HTTP API make: `explain` and `feature_importance`.

    explain(model, X, reference)          -> Explanation (per-row attributions, raw field names)
    feature_importance(model, reference)  -> FeatureImportance (mean |attribution| over reference rows)

`method="auto"` picks expected gradients for a network model (it has `net` and `processor`), and for
an ensemble of networks whose logit is a (weighted) mean of theirs: attributions are linear in the
model, so the ensemble's are the same mean of its members'. Everything else (DynamicLinear, a median
ensemble, any `predict_logits` model) gets the permutation explainer over raw fields, which costs
many model calls per row. Attributions are on the logit scale, before calibration.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from within.explain.explanation import Explanation, FeatureImportance
from within.explain.inputs import has_network, n_rows, processed, raw_frame, sample_rows, spec_of, take

METHODS = ("auto", "gradient", "permutation")


def linear_network_members(model: Any) -> tuple[list[Any], np.ndarray] | None:
    """(members, weights) when the model's logit is sum_k weights[k] * member_k's logit and every
    member is a network model; else None."""
    members = list(getattr(model, "base_models", None) or [])
    how = getattr(model, "aggregation_method", None)
    if not members or how not in ("mean", "weighted") or not all(has_network(m) for m in members):
        return None
    weights = np.full(len(members), 1.0 / len(members)) if how == "mean" else np.asarray(model.get_model_weights())
    return members, weights


def _method(model: Any, method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"explain: method {method!r} is not one of {list(METHODS)}")
    if not callable(getattr(model, "predict_logits", None)):
        raise TypeError(f"explain: {type(model).__name__} has no predict_logits(X); explain a fitted model")
    spec_of(model)
    if method == "gradient" and not (has_network(model) or linear_network_members(model)):
        raise ValueError(f"explain: method='gradient' needs a network model (.net with embed_inputs and "
                         f".processor); {type(model).__name__} has none: use method='permutation'")
    if method == "auto":
        return "gradient" if has_network(model) or linear_network_members(model) else "permutation"
    return method


def explain(
    model: Any,
    X: Any,
    reference: Any,
    method: str = "auto",
    nsamples: int = 200,
    permutations: int = 10,
    background_size: int | None = None,
    seed: int = 0,
) -> Explanation:
    """Per-field attributions of the logit of each row of X (a DataFrame, one ad dict, a list of
    dicts, or processed AdBatch arrays for a network model).

    reference: rows the attributions are measured against (typically a sample of training rows);
        base_value is the model's mean logit over them.
    nsamples: expected-gradient draws per row (method gradient).
    permutations: antithetic permutations per row (method permutation).
    background_size: reference rows used (default 200 for gradient, 100 for permutation).
    """
    chosen = _method(model, method)
    ensemble = linear_network_members(model) if chosen == "gradient" and not has_network(model) else None
    if ensemble is not None:
        members, weights = ensemble
        parts = [explain(m, X, reference, method="gradient", nsamples=nsamples, background_size=background_size,
                         seed=seed) for m in members]
        if any(e.feature_names != parts[0].feature_names for e in parts):
            raise ValueError("explain: the ensemble's members see different fields; use method='permutation'")
        return Explanation(
            values=sum(w * e.values for w, e in zip(weights, parts)),
            feature_names=parts[0].feature_names, modalities=parts[0].modalities,
            base_value=float(sum(w * e.base_value for w, e in zip(weights, parts))),
            logits=sum(w * e.logits for w, e in zip(weights, parts)),
            method="gradient", method_note=f"{parts[0].method_note}; the members' attributions, averaged as their "
                                            f"logits are ({len(members)} members)",
        )
    if chosen == "gradient":
        from within.explain.gradient import explain_network

        return explain_network(model, X, reference, nsamples=nsamples, background_size=background_size or 200,
                               seed=seed)
    from within.explain.permutation import explain_fields

    return explain_fields(model, X, reference, background_size=background_size or 100, permutations=permutations,
                          seed=seed)


def feature_importance(
    model: Any,
    reference: Any,
    n_rows_explained: int = 500,
    method: str = "auto",
    seed: int = 0,
    **kwargs: Any,
) -> FeatureImportance:
    """Global importance: mean |attribution| per field over up to `n_rows_explained` reference rows,
    each explained against the reference (raw rows, or processed arrays for a network model).
    Extra keyword arguments go to `explain`."""
    if n_rows_explained < 1:
        raise ValueError(f"feature_importance: n_rows_explained must be >= 1, got {n_rows_explained}")
    chosen = _method(model, method)
    if chosen == "gradient" and has_network(model):
        reference = processed(model, reference)  # once, not once per use
        rows: Any = take(reference, sample_rows(n_rows(reference), n_rows_explained, seed + 1))
    else:
        reference = raw_frame(model, reference, "reference")
        rows = reference.iloc[sample_rows(len(reference), n_rows_explained, seed + 1)]
    explanation = explain(model, rows, reference, method=chosen, seed=seed, **kwargs)
    return FeatureImportance.from_explanation(explanation)
