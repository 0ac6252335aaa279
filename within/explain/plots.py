"""Pictures of explanations, drawn by shap's own plots (matplotlib, Agg backend):
a bar chart of global importance and a waterfall of one row's attributions."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from within.explain.explanation import Explanation, FeatureImportance


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, path: str | Path, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.gcf()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_importance(importance: FeatureImportance, path: str | Path, top: int = 20,
                    rows_label: str = "reference rows") -> Path:
    """Bar chart of mean |attribution| per field (logit scale), largest on top; `rows_label` says
    which rows were averaged (the title reads "over N <rows_label>")."""
    import shap

    plt = _pyplot()
    imp = importance.importance
    exp = shap.Explanation(values=imp.to_numpy(dtype=np.float64), feature_names=list(imp.index))
    shap.plots.bar(exp, max_display=top, show=False)
    plt.gca().set_xlabel("mean |attribution| (logit)")
    return _save(plt, path, f"Global importance over {importance.n_rows} {rows_label} ({importance.method})")


def plot_waterfall(explanation: Explanation, path: str | Path, row: int = 0, top: int = 12) -> Path:
    """One row: from the base value (mean reference logit) to the row's logit, field by field."""
    import shap

    if not 0 <= row < len(explanation):
        raise IndexError(f"plot_waterfall: row {row} out of range for {len(explanation)} explained rows")
    plt = _pyplot()
    exp = shap.Explanation(values=explanation.values[row], base_values=explanation.base_value,
                           feature_names=explanation.feature_names)
    shap.plots.waterfall(exp, max_display=top, show=False)
    return _save(plt, path, f"Row {row}: logit {explanation.logits[row]:.3f} = base {explanation.base_value:.3f} "
                            f"+ attributions ({explanation.method})")
