"""What an explanation hands back: per-field attributions on the logit scale, the base value, and
a per-modality summary; and global importance over a reference sample."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from within.explain.fields import presence_name

SCALE_NOTE = ("attributions are on the model's logit scale (before calibration): base_value + the sum of a row's "
              "attributions = that row's logit")


def merge_columns(frame: pd.DataFrame, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Each group's columns replaced by one column, their sum, where the first of them stood.
    Attributions add, so a group's attribution is the sum of its fields' attributions."""
    grouped = [c for cols in groups.values() for c in cols]
    unknown = [c for c in grouped if c not in frame.columns]
    if unknown or len(set(grouped)) != len(grouped):
        raise ValueError(f"groups: fields {unknown or grouped} are unknown or in two groups; "
                         f"give each of {list(frame.columns)} at most once")
    first = {cols[0]: name for name, cols in groups.items() if cols}
    out = {}
    for c in frame.columns:
        if c in first:
            out[first[c]] = frame[list(groups[first[c]])].sum(axis=1)
        elif c not in grouped:
            out[c] = frame[c]
    return pd.DataFrame(out, index=frame.index)


@dataclasses.dataclass
class Explanation:
    """Attributions of rows of raw ads to their raw fields.

    values[i, j] is field j's share of row i's logit relative to `base_value`, the mean logit over
    the reference rows: base_value + values[i].sum() = logits[i] up to `additivity_gap[i]`
    (exactly 0 for method "permutation"; Monte Carlo error of expected gradients for "gradient").
    """

    values: np.ndarray          # [N, F]
    feature_names: list[str]    # raw fields (plus `<modality>:present` entries where presence varies)
    modalities: list[str]       # modality of each feature: tabular | text | image
    base_value: float
    logits: np.ndarray          # [N] the model's logit for each row
    method: str                 # "gradient" (expected gradients) | "permutation"
    method_note: str = ""
    scale: str = "logit"

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.logits = np.asarray(self.logits, dtype=np.float64).reshape(-1)
        if self.values.shape != (len(self.logits), len(self.feature_names)):
            raise ValueError(f"Explanation: values has shape {self.values.shape}, expected "
                             f"({len(self.logits)}, {len(self.feature_names)}) for {len(self.logits)} rows")
        if len(self.modalities) != len(self.feature_names):
            raise ValueError("Explanation: modalities needs one entry per feature name")

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def additivity_gap(self) -> np.ndarray:
        """logit - (base_value + sum of attributions), per row."""
        return self.logits - self.base_value - self.values.sum(axis=1)

    def modality_summary(self) -> pd.DataFrame:
        """[N, modality] sums of the attributions of each modality's fields (text, image, tabular)."""
        frame = self.to_frame()
        return frame.T.groupby(np.asarray(self.modalities)).sum().T

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, columns=self.feature_names)

    def grouped(self, groups: Mapping[str, Sequence[str]]) -> Explanation:
        """Fields that describe one thing (e.g. a city and its coordinates) as one attribution each:
        {"region": ["country", "state", "city", "latitude", "longitude"]}. A group's fields must
        share a modality."""
        modality = dict(zip(self.feature_names, self.modalities))
        for name, cols in groups.items():
            kinds = {modality.get(c) for c in cols}
            if len(kinds) > 1:
                raise ValueError(f"groups[{name!r}]: fields {list(cols)} span modalities {sorted(map(str, kinds))}")
        frame = merge_columns(self.to_frame(), groups)
        first_of = {name: cols[0] for name, cols in groups.items() if cols}
        names = list(frame.columns)
        return dataclasses.replace(self, values=frame.to_numpy(), feature_names=names,
                                   modalities=[modality[first_of.get(n, n)] for n in names])

    def drop_zero_presence(self) -> Explanation:
        """Without `<modality>:present` columns that are exactly 0 on every row (presence never varied)."""
        presence = {presence_name(m) for m in ("tabular", "text", "image")}
        keep = [j for j, name in enumerate(self.feature_names)
                if name not in presence or np.any(self.values[:, j] != 0)]
        return dataclasses.replace(self, values=self.values[:, keep],
                                   feature_names=[self.feature_names[j] for j in keep],
                                   modalities=[self.modalities[j] for j in keep])

    def row(self, i: int) -> dict[str, Any]:
        """One row as JSON-able data, fields sorted by |attribution| (what an HTTP /explain returns)."""
        order = np.argsort(-np.abs(self.values[i]), kind="stable")
        summary = self.modality_summary().iloc[i]
        return {
            "logit": float(self.logits[i]),
            "base_value": float(self.base_value),
            "attributions": {self.feature_names[j]: float(self.values[i, j]) for j in order},
            "modalities": {m: float(v) for m, v in summary.items()},
            "additivity_gap": float(self.additivity_gap[i]),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "note": SCALE_NOTE, "method": self.method, "method_note": self.method_note,
                "base_value": float(self.base_value), "rows": [self.row(i) for i in range(len(self))]}


@dataclasses.dataclass
class FeatureImportance:
    """Global importance: mean |attribution| of each field (and of each modality's summed
    attribution) over `n_rows` reference rows, on the logit scale."""

    importance: pd.Series        # field -> mean |attribution|, largest first
    modality_importance: pd.Series
    modalities: dict[str, str]   # field -> modality
    n_rows: int
    method: str

    @classmethod
    def from_explanation(cls, explanation: Explanation) -> FeatureImportance:
        imp = pd.Series(np.abs(explanation.values).mean(axis=0), index=explanation.feature_names)
        mod = explanation.modality_summary().abs().mean(axis=0)
        return cls(imp.sort_values(ascending=False, kind="stable"), mod.sort_values(ascending=False, kind="stable"),
                   dict(zip(explanation.feature_names, explanation.modalities)), len(explanation), explanation.method)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": "logit", "statistic": "mean |attribution| over reference rows", "n_rows": self.n_rows,
                "method": self.method, "fields": {k: float(v) for k, v in self.importance.items()},
                "modalities": {k: float(v) for k, v in self.modality_importance.items()},
                "field_modality": dict(self.modalities)}
