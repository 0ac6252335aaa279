"""The prediction service's explainer: records in, one explanation per ad out (POST /explain)."""
from __future__ import annotations

from typing import Any

from within.explain.attribution import explain


class RecordExplainer:
    """SHAP attributions for records, against the bundle's reference sample (reference.parquet).

    Args:
        model: the served model (it must carry `reference`, as bundles written by train.py do).
        nsamples, background_size: the explainer's cost per request (see within.explain.explain).
    """

    def __init__(self, model: Any, nsamples: int = 100, background_size: int | None = 100) -> None:
        if getattr(model, "reference", None) is None:
            raise ValueError("explainer: the bundle holds no reference sample (reference.parquet); retrain with "
                             "explain.reference_rows > 0, or serve with explainer=null")
        self.model, self.nsamples, self.background_size = model, int(nsamples), background_size

    def __call__(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        result = explain(self.model, records, self.model.reference, nsamples=self.nsamples,
                         background_size=self.background_size)
        return [{**result.row(i), "scale": result.scale, "method": result.method} for i in range(len(result))]
