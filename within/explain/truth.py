"""Attributions of a KNOWN logit (the simulator's), to check a model's attributions against.

The truth is a sum of terms, each reading a few raw fields (`AdMarketSimulator.true_logit_terms`,
whose frame carries `attrs["fields"]`: term -> the columns it reads). Each term is attributed
to its fields by its exact interventional Shapley values against the same reference rows a
SHAP explainer uses:

    v_t(S) = mean over reference rows r of term_t(x's values on S, r's values elsewhere)
    phi_f  = sum over terms t reading f, over S within t's other fields,
             |S|! (k - |S| - 1)! / k! * (v_t(S + f) - v_t(S))          (k = fields of t)

A one-field term goes wholly to its field (term(x) - its reference mean). An interaction term
is shared between its fields by Shapley's rule; for a device x placement table, half of the
part neither main effect explains goes to each. Summed over fields, phi is the true logit minus
its mean over the reference rows, exactly.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pandas as pd

TermsFn = Callable[[pd.DataFrame], pd.DataFrame]


def _hybrid(rows: pd.DataFrame, reference: pd.DataFrame, subset: tuple[str, ...]) -> pd.DataFrame:
    """Every (row, reference row) pair: the reference row with the row's values on `subset`
    (row-major: pair (i, r) is at i * len(reference) + r)."""
    n, m = len(rows), len(reference)
    out = reference.iloc[np.tile(np.arange(m), n)].reset_index(drop=True)
    for col in subset:
        out[col] = np.repeat(rows[col].to_numpy(), m)
    return out


def field_shapley(terms_fn: TermsFn, rows: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """[len(rows), field] exact interventional Shapley values of the summed terms (module docstring).

    Terms that are 0 on every row and reference row (e.g. drift when it is off) are skipped.
    """
    rows = rows.reset_index(drop=True)
    reference = reference.reset_index(drop=True)
    terms, ref_terms = terms_fn(rows), terms_fn(reference)
    fields_of: dict[str, list[str]] = terms.attrs.get("fields") or {}
    missing = [t for t in terms.columns if t not in fields_of]
    if missing:
        raise ValueError(f"field_shapley: terms {missing} have no entry in attrs['fields'] (term -> columns it reads)")
    n, m = len(rows), len(reference)
    out: dict[str, np.ndarray] = {}
    for term, fields in fields_of.items():
        if not fields or (not terms[term].any() and not ref_terms[term].any()):
            continue
        k = len(fields)
        value = {(): np.full(n, ref_terms[term].mean()), tuple(fields): terms[term].to_numpy(np.float64)}
        for size in range(1, k):
            for subset in itertools.combinations(fields, size):
                mixed = terms_fn(_hybrid(rows, reference, subset))[term].to_numpy(np.float64)
                value[subset] = mixed.reshape(n, m).mean(axis=1)
        for f in fields:
            others = [g for g in fields if g != f]
            phi = np.zeros(n)
            for size in range(k):
                weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
                for subset in itertools.combinations(others, size):
                    with_f = tuple(g for g in fields if g in subset or g == f)
                    phi += weight * (value[with_f] - value[subset])
            out[f] = out.get(f, np.zeros(n)) + phi
    return pd.DataFrame(out, index=pd.RangeIndex(n))


def rank_agreement(importance: pd.Series, truth: pd.Series) -> dict[str, float]:
    """Spearman correlation of two per-field scores over the fields both name (ties get mean ranks)."""
    from scipy.stats import spearmanr

    common = [f for f in importance.index if f in truth.index]
    if len(common) < 3:
        raise ValueError(f"rank_agreement: needs >= 3 common fields, got {common}")
    rho = spearmanr(importance[common].to_numpy(), truth[common].to_numpy()).statistic
    return {"spearman": float(rho), "n_fields": len(common)}
