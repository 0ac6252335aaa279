"""Explanations of ad-score models: SHAP attributions on raw fields, global importance, the
cross-modal attention view, and fairness by demographic group.

    from within.explain import explain, feature_importance
    e = explain(model, ads, reference=train_sample)       # Explanation: logit-scale attributions
    e.row(0)["attributions"]                              # {raw field: share of the logit}
    feature_importance(model, train_sample).importance    # mean |attribution| per field
"""
from within.explain.attribution import METHODS, explain, feature_importance
from within.explain.explanation import Explanation, FeatureImportance

__all__ = ["METHODS", "Explanation", "FeatureImportance", "explain", "feature_importance"]
