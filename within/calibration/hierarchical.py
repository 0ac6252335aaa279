"""Hierarchical calibration: a global calibrator plus empirical-Bayes logit offsets per group level.

Model (a random-intercept logistic model on top of the global map, Gelman & Hill 2007, ch. 14):

    logit p_i = g(s_i) + d1[account(i)] + d2[account, campaign(i)] + d3[account, campaign, ad_group(i)]

`g` is the global calibrator (temperature with bias, Platt, isotonic or spline). Each increment
d_l ~ N(0, tau_l^2) is shrunk toward its parent, so a small group stays near its parent's rate.
tau_l^2 is fixed by `smoothing` (prior precision 1/tau^2) or, with smoothing=None, estimated per
level by the method of moments of DerSimonian & Laird (1986). Levels are fitted parent first and
refitted by backfitting (Hastie & Tibshirani, 1990) for up to `max_iter` passes.

Group keys are nested paths (a campaign is keyed by (account, campaign)), so ids need not be
unique across parents. Fallback: an unseen group has no increment of its own, so it takes its
parent's offset; a row whose account is unseen gets the global map alone. Within a group the map
is the global monotone map plus a constant, so order is preserved.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from within.calibration._methods import make_base
from within.calibration._offsets import backfit
from within.calibration.base import (
    Calibrator,
    as_keys,
    calibrator_from_dict,
    check_groups,
    check_labels,
    check_scores,
    register,
    sigmoid,
)


def _path_index(keys: list[np.ndarray], depth: int) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays(keys[: depth + 1])


@register("hierarchical")
class HierarchicalCalibrator(Calibrator):
    """Global calibrator + per-level shrunken logit offsets (see module docstring).

    Args:
        hierarchy_levels: group levels, parent first; keys of the `groups` dict ("account" also
            matches "account_id" and back).
        calibration_method: global map, 'temperature' | 'platt' | 'isotonic' | 'spline'.
        smoothing: prior precision 1/tau^2 on every offset (larger -> stronger pull to the
            parent); None estimates tau^2 per level from the data (method of moments).
        max_iter: backfitting passes over the levels.
        tol: stop when no offset moves more than this (logit units) in a pass.
    """

    def __init__(
        self,
        hierarchy_levels: Sequence[str] = ("account", "campaign", "ad_group"),
        calibration_method: str = "temperature",
        smoothing: float | None = None,
        max_iter: int = 5,
        tol: float = 1e-4,
    ) -> None:
        levels = tuple(hierarchy_levels)
        if not levels or not all(isinstance(x, str) and x for x in levels):
            raise ValueError(f"hierarchy_levels must be a non-empty list of level names, got {hierarchy_levels!r}")
        make_base(calibration_method, "HierarchicalCalibrator")
        if smoothing is not None and float(smoothing) < 0:
            raise ValueError(f"smoothing must be >= 0 or None (estimate from data), got {smoothing}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.hierarchy_levels = levels
        self.calibration_method = calibration_method
        self.smoothing = None if smoothing is None else float(smoothing)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.base_: Calibrator | None = None
        self.paths_: list[pd.MultiIndex] = []
        self.offsets_: list[np.ndarray] = []
        self.counts_: list[np.ndarray] = []
        self.prior_precision_: list[float] = []
        self.n_iter_ = 0

    def _base(self) -> Calibrator:
        base = make_base(self.calibration_method, "HierarchicalCalibrator")
        if self.calibration_method == "temperature":
            base = type(base)(fit_bias=True)  # offsets are shrunk to 0, so the global rate needs a bias
        return base

    def _keys(self, groups: Any, n: int) -> list[np.ndarray]:
        g = check_groups(groups, n, self.hierarchy_levels, "HierarchicalCalibrator")
        return [as_keys(g[lvl]) for lvl in self.hierarchy_levels]

    def fit(self, X: Any, y: Any, groups: dict | None = None, weight: Any = None) -> HierarchicalCalibrator:
        s = check_scores(X, "X")
        clicks, imps = check_labels(y, s.shape[0], weight)
        keys = self._keys(groups, s.shape[0])
        self.base_ = self._base().fit(s, clicks, weight=imps if weight is not None else None)
        base_eta = self.base_.transform_logit(s)
        codes, self.paths_ = [], []
        for depth in range(len(keys)):
            c, uniq = _path_index(keys, depth).factorize()
            codes.append(c)
            self.paths_.append(uniq)
        self.counts_ = [np.bincount(c, imps, len(u)) for c, u in zip(codes, self.paths_)]
        self.offsets_, self.prior_precision_, self.n_iter_ = backfit(
            base_eta, clicks, imps, codes, [len(u) for u in self.paths_], self.smoothing, self.max_iter, self.tol
        )
        self.fitted_ = True
        return self

    def _row_offsets(self, keys: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(keys[0].shape[0])
        for depth, (paths, off) in enumerate(zip(self.paths_, self.offsets_)):
            idx = paths.get_indexer(_path_index(keys, depth))
            seen = idx >= 0
            out[seen] += off[idx[seen]]  # unseen: no increment -> parent's offset (fallback)
        return out

    def transform_logit(self, X: Any, groups: dict | None = None) -> np.ndarray:
        self._require_fitted()
        s = check_scores(X, "X")
        return self.base_.transform_logit(s) + self._row_offsets(self._keys(groups, s.shape[0]))

    def transform(self, X: Any, groups: dict | None = None) -> np.ndarray:
        """Calibrated probabilities for logits X in `groups` ({level: array[N]})."""
        return sigmoid(self.transform_logit(X, groups))

    def fit_transform(self, X: Any, y: Any, groups: dict | None = None, weight: Any = None) -> np.ndarray:
        return self.fit(X, y, groups, weight=weight).transform(X, groups)

    def get_calibration_mapping(self) -> dict[str, Any]:
        """{"global": base calibrator dict, "levels": {level: {"prior_precision", "groups":
        {"a/b": {"offset": increment vs parent, "total": cumulative logit offset, "n": impressions}}}}}"""
        self._require_fitted()
        out: dict[str, Any] = {"global": self.base_.to_dict(), "levels": {}}
        parent_total: dict[tuple, float] = {(): 0.0}
        for lvl, paths, off, cnt, lam in zip(self.hierarchy_levels, self.paths_, self.offsets_,
                                             self.counts_, self.prior_precision_):
            groups, totals = {}, {}
            for path, d, n in zip(paths.tolist(), off.tolist(), cnt.tolist()):
                tot = parent_total.get(tuple(path[:-1]), 0.0) + d
                totals[tuple(path)] = tot
                groups["/".join(path)] = {"offset": d, "total": tot, "n": n}
            out["levels"][lvl] = {"prior_precision": lam, "groups": groups}
            parent_total = totals
        return out

    def _params(self) -> dict[str, Any]:
        return {"hierarchy_levels": list(self.hierarchy_levels), "calibration_method": self.calibration_method,
                "smoothing": self.smoothing, "max_iter": self.max_iter, "tol": self.tol}

    def _state(self) -> dict[str, Any]:
        return {
            "base": self.base_.to_dict(),
            "levels": [
                {"paths": [list(p) for p in paths.tolist()], "offsets": off.tolist(), "n": cnt.tolist(),
                 "prior_precision": lam}
                for paths, off, cnt, lam in zip(self.paths_, self.offsets_, self.counts_, self.prior_precision_)
            ],
            "n_iter": self.n_iter_,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if len(state["levels"]) != len(self.hierarchy_levels):
            raise ValueError(
                f"hierarchical state: {len(state['levels'])} levels stored, params name {len(self.hierarchy_levels)}"
            )
        self.base_ = calibrator_from_dict(state["base"])
        self.paths_, self.offsets_, self.counts_, self.prior_precision_ = [], [], [], []
        for depth, lv in enumerate(state["levels"]):
            paths = [tuple(str(k) for k in p) for p in lv["paths"]]
            if any(len(p) != depth + 1 for p in paths) or len(paths) != len(lv["offsets"]):
                raise ValueError(f"hierarchical state: level {depth} paths/offsets are inconsistent")
            if paths:
                self.paths_.append(pd.MultiIndex.from_tuples(paths))
            else:
                self.paths_.append(pd.MultiIndex.from_arrays([np.array([], dtype=str)] * (depth + 1)))
            self.offsets_.append(np.asarray(lv["offsets"], dtype=np.float64))
            self.counts_.append(np.asarray(lv["n"], dtype=np.float64))
            self.prior_precision_.append(float(lv["prior_precision"]))
        self.n_iter_ = int(state["n_iter"])
