"""Attributions for any model with `predict_logits(raw rows)`: shap's PermutationExplainer over raw fields.

Fields are the masker's features: a masked field takes a reference row's value, and the model
sees whole raw rows (text, images and all), so this works for DynamicLinear, ensembles and
networks alike. shap's maskers compare values numerically, so each field's values (strings,
images, numbers) are coded as integers into a table of the distinct values of the explained and
reference rows, and decoded into a DataFrame for every model call. Each permutation's steps
telescope, so base_value + the attributions = the logit exactly (base_value is the mean logit
over the reference rows).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from within.explain.explanation import Explanation
from within.explain.fields import field_modalities
from within.explain.inputs import raw_frame, sample_rows, spec_of

NOTE = "shap.PermutationExplainer over raw fields (reference rows fill masked fields); additivity is exact"


class FieldCodes:
    """Integer codes for the values of each field, and the way back to a raw DataFrame."""

    def __init__(self, frame: pd.DataFrame, fields: list[str]) -> None:
        self.fields = fields
        self.tables: list[np.ndarray] = []
        codes = np.empty((len(frame), len(fields)), dtype=np.int64)
        for j, name in enumerate(fields):
            values = frame[name].to_numpy(dtype=object)
            # images are arrays: one code per object (rows of one ad share the object)
            key = np.fromiter(map(id, values), np.int64, len(values)) if _holds_arrays(values) else frame[name]
            codes[:, j], _ = pd.factorize(key, use_na_sentinel=False)
            first = np.unique(codes[:, j], return_index=True)[1]
            self.tables.append(values[first])
        self.codes = codes

    def decode(self, codes: np.ndarray) -> pd.DataFrame:
        codes = np.asarray(codes).astype(np.int64)
        frame = pd.DataFrame({name: self.tables[j][codes[:, j]] for j, name in enumerate(self.fields)})
        return frame.infer_objects()  # numbers come back as numbers, not objects


def _holds_arrays(values: np.ndarray) -> bool:
    return any(isinstance(v, np.ndarray) or hasattr(v, "detach") for v in values[:50])


def explain_fields(
    model: Any,
    X: Any,
    reference: Any,
    background_size: int = 100,
    permutations: int = 10,
    seed: int = 0,
) -> Explanation:
    """Attribute each row's logit to its raw fields with `permutations` antithetic permutations
    per row; each costs 2 * n_fields + 1 model calls on `background_size` reference rows."""
    import shap

    if permutations < 1:
        raise ValueError(f"explain: permutations must be >= 1, got {permutations}")
    spec = spec_of(model)
    rows = raw_frame(model, X, "X")
    ref = raw_frame(model, reference, "reference")
    ref = ref.iloc[sample_rows(len(ref), background_size, seed)].reset_index(drop=True)
    fields = [f.name for f in spec.fields if f.name in rows.columns and f.name in ref.columns]
    absent = [f.name for f in spec.fields if f.required and f.name not in fields]
    if absent:
        raise ValueError(f"explain: fields {absent} are missing from X or the reference; give both every field")
    codes = FieldCodes(pd.concat([rows[fields], ref[fields]], ignore_index=True), fields)
    row_codes, ref_codes = codes.codes[: len(rows)], codes.codes[len(rows):]

    def logit_of_codes(c: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_logits(codes.decode(c)), dtype=np.float64).reshape(-1)

    masker = shap.maskers.Independent(ref_codes, max_samples=len(ref_codes))
    explainer = shap.PermutationExplainer(logit_of_codes, masker, seed=seed)
    result = explainer(row_codes, max_evals=permutations * (2 * len(fields) + 1), silent=True)
    return Explanation(
        values=result.values,
        feature_names=fields,
        modalities=field_modalities(spec, fields),
        base_value=float(logit_of_codes(ref_codes).mean()),
        logits=logit_of_codes(row_codes),
        method="permutation",
        method_note=NOTE,
    )
