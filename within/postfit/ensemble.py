"""Post-fit step `ensemble`: how the ensemble compares with its members, and its spread.

The ensemble itself is built before the post-fit steps (model=ensemble trains or loads the members),
so `calibrate` and `intervals` already see it. This step only measures: member vs ensemble AUC and
log loss on the test split (measurement only; each is calibrated on the calib split), the member
weights, and the mean across-member standard deviation. With a single model it records nothing.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from within.postfit.context import PostfitContext, labels_of

log = logging.getLogger(__name__)


class EnsembleReport:
    name = "ensemble"

    @staticmethod
    def skip_reason(model) -> str | None:
        return None if getattr(model, "base_models", None) is not None else "a single model; nothing to compare"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.metrics import auc, logloss

        predictor = ctx.model
        frame = ctx.scoring_frame()
        y, w = labels_of(predictor, frame)
        members = predictor.member_logits(frame)
        combined = predictor.aggregate(members)
        # Members' raw logits carry different biases; compare each after the same calibrator, fitted
        # on the calib split for that member alone (none configured: raw sigmoid).
        _, calib = ctx.calibration_frame()
        calib_members = predictor.member_logits(calib)
        yc, wc = labels_of(predictor, calib)

        def scores(logits: np.ndarray, calib_logits: np.ndarray) -> tuple[float, float]:
            if ctx.calibrator_factory is None:
                p = 1.0 / (1.0 + np.exp(-logits))
            else:
                cal = ctx.calibrator_factory()
                cal.fit(calib_logits, yc, groups=predictor.group_columns(calib), weight=wc)
                p = cal.transform(logits, groups=predictor.group_columns(frame))
            return auc(p, y, weight=w), logloss(p, y, weight=w)

        member_scores = [scores(members[:, j], calib_members[:, j]) for j in range(members.shape[1])]
        ens_auc, ens_ll = scores(combined, predictor.aggregate(calib_members))
        best_auc = max(a for a, _ in member_scores)
        best_ll = min(ll for _, ll in member_scores)
        ctx.metrics.update({
            "ensemble/n_members": float(members.shape[1]),
            "ensemble/auc": ens_auc, "ensemble/logloss": ens_ll,
            "ensemble/best_member_auc": best_auc, "ensemble/best_member_logloss": best_ll,
            "ensemble/auc_gain": ens_auc - best_auc, "ensemble/logloss_gain": best_ll - ens_ll,
            "ensemble/member_logit_sd": float(members.std(axis=1, ddof=1).mean()) if members.shape[1] > 1 else 0.0,
        })
        summary = {
            "aggregation_method": predictor.aggregation_method,
            "weights": predictor.get_model_weights().tolist(),
            "members": [{"auc": a, "logloss": ll} for a, ll in member_scores],
            "ensemble": {"auc": ens_auc, "logloss": ens_ll},
            "scored_on": "test split; each member and the ensemble calibrated alone on the calib split",
        }
        (ctx.report_dir / "ensemble.json").write_text(json.dumps(summary, indent=2))
        ctx.metadata["ensemble"] = {"n_members": int(members.shape[1]),
                                    "aggregation_method": predictor.aggregation_method}
