"""AccountHealthPredictor: a calibrated churn model over account health indicators, read as a 0-100
health score with a risk level, SHAP contributing factors, costed recommendations and early warning.

* Churn model (`model_type`): "gbm" is LightGBM (its model saves as text, `model_to_string`, and loads
  with `Booster(model_str=...)`, a parser that runs no code; shap's TreeExplainer reads it), "logistic"
  is sklearn's LogisticRegression on standardised indicators, kept as its coefficient arrays. sklearn's
  tree models were not an option: they only persist through pickle.
* Calibration: the churn model is fitted on `1 - calibration_fraction` of the training rows and a
  `within.calibration` calibrator (default Platt) on the log-odds of the held-out rest, so
  `predict_churn_risk` is a calibrated probability. When ids repeat (an account-month panel) the split
  is by account, so no account sits on both sides.
* health = 100 * (1 - churn probability); risk level = the most severe level of `risk_thresholds`
  whose threshold the health is below ({"critical": 30, "high": 50, "medium": 70}: health 42 is
  "high"), "low" above them all.
* Contributing factors are SHAP values of the churn model's log-odds (TreeExplainer, path-dependent,
  for gbm; LinearExplainer, independent masker at the training means, for logistic), one-hot columns
  summed back to their raw indicator.
* A recommendation moves one risk-raising, actionable indicator to its healthy value (median, or
  most common category, among the quarter of training accounts with the lowest predicted risk;
  `healthy_values` overrides it where that value is not something an account can do),
  re-scores the account, and reports the change in churn risk with the training churn rates at the
  current and the healthy value as evidence.
* Early warning (`early_warning`) fits a line to each account's health over its last `time_window`
  periods and flags a drop of at least `warning_drop` points across the window.
* `trend_indicators` adds `<name>_trend` = value - mean of the previous `time_window` periods of the
  same account (`within.data.accounts.trailing_mean`); it needs `period_column` and each account's history.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from within.calibration import calibrator_from_dict, make_calibrator
from within.data.accounts import trailing_mean
from within.features.spec import FeatureError
from within.models.base import BaseMLModel, BundleError, register_model

MODEL_TYPES = ("gbm", "logistic")
DEFAULT_RISK_THRESHOLDS = {"critical": 30.0, "high": 50.0, "medium": 70.0}
LOWEST_RISK_LEVEL = "low"
EVIDENCE_BINS = 10
GBM_PARAMS: dict[str, Any] = {
    "objective": "binary", "learning_rate": 0.03, "num_leaves": 8, "min_child_samples": 40,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "verbose": -1, "num_threads": 1, "deterministic": True, "force_col_wise": True,
}
GBM_MAX_ROUNDS, GBM_EARLY_STOP = 2000, 100


class _Encoder:
    """Raw indicator frame -> float matrix: numerics as they are (NaN kept), categoricals one-hot over
    the training categories (an unseen category is all zeros). JSON round trip via to_dict."""

    def __init__(self, numeric: list[str], categories: dict[str, list[str]]) -> None:
        self.numeric = numeric
        self.categories = categories
        self.columns = numeric + [f"{c}={v}" for c, vals in categories.items() for v in vals]
        self.source = numeric + [c for c, vals in categories.items() for _ in vals]

    @classmethod
    def fit(cls, frame: pd.DataFrame, categorical: Sequence[str]) -> _Encoder:
        cats = {c: sorted(frame[c].astype(str).unique().tolist()) for c in categorical}
        return cls([c for c in frame.columns if c not in cats], cats)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        parts = []
        for c in self.numeric:
            try:
                parts.append(pd.to_numeric(frame[c], errors="raise").to_numpy(np.float64)[:, None])
            except (ValueError, TypeError) as err:
                raise FeatureError(f"AccountHealthPredictor: indicator '{c}' must be numeric ({err}); "
                                   f"list it in categorical= if it is a category") from None
        for c, vals in self.categories.items():
            v = frame[c].astype(str).to_numpy()
            parts.append((v[:, None] == np.asarray(vals, dtype=object)[None, :]).astype(np.float64))
        return np.hstack(parts) if parts else np.zeros((len(frame), 0))

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categories": self.categories}


def _risk_level(health: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    levels = np.full(health.shape, LOWEST_RISK_LEVEL, dtype=object)
    for name, cut in sorted(thresholds.items(), key=lambda kv: -kv[1]):  # most lenient first
        levels[health < cut] = name
    return levels


@register_model
class AccountHealthPredictor(BaseMLModel):
    """Account health (0-100), calibrated churn risk, SHAP factors and recommended actions.

    indicators: health indicator columns. risk_thresholds: risk level -> health threshold.
    time_window: periods for trend features and early warning. model_type: "gbm" | "logistic".
    id_column / period_column: the account key and (for panels) the period column. categorical:
    indicators to one-hot (default: the non-numeric ones). actionable: indicators a recommendation
    may move (default all). action_texts: indicator -> what to do, e.g. "launch a new campaign".
    healthy_values: indicator -> the value a recommendation moves it to (default: learned, see above).
    calibration: a within.calibration name. model_params: overrides of GBM_PARAMS (gbm) or of
    LogisticRegression's arguments (logistic).
    """

    def __init__(
        self,
        indicators: Sequence[str],
        risk_thresholds: Mapping[str, float] | None = None,
        time_window: int = 3,
        model_type: str = "gbm",
        *,
        id_column: str = "account_id",
        period_column: str | None = None,
        categorical: Sequence[str] | None = None,
        trend_indicators: Sequence[str] = (),
        actionable: Sequence[str] | None = None,
        action_texts: Mapping[str, str] | None = None,
        healthy_values: Mapping[str, Any] | None = None,
        calibration: str = "platt",
        calibration_fraction: float = 0.25,
        warning_drop: float = 10.0,
        model_params: Mapping[str, Any] | None = None,
        random_state: int = 0,
        model_name: str = "account_health",
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        who = "AccountHealthPredictor"
        if isinstance(indicators, str) or not indicators or not all(isinstance(c, str) for c in indicators):
            raise ValueError(f"{who}.indicators: must be a non-empty list of column names, got {indicators!r}")
        if len(set(indicators)) != len(indicators):
            raise ValueError(f"{who}.indicators: {list(indicators)} lists a column twice")
        thresholds = dict(DEFAULT_RISK_THRESHOLDS if risk_thresholds is None else risk_thresholds)
        for name, cut in thresholds.items():
            if not isinstance(cut, (int, float)) or not 0 <= cut <= 100:
                raise ValueError(f"{who}.risk_thresholds: {name!r} must be a health score in [0, 100], got {cut!r}")
        if LOWEST_RISK_LEVEL in thresholds:
            raise ValueError(f"{who}.risk_thresholds: {LOWEST_RISK_LEVEL!r} is the level above every threshold; "
                             f"rename that key")
        if len(set(thresholds.values())) != len(thresholds):
            raise ValueError(f"{who}.risk_thresholds: two levels share a threshold in {thresholds}")
        if not isinstance(time_window, int) or time_window < 1:
            raise ValueError(f"{who}.time_window: must be an int >= 1 (periods), got {time_window!r}")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{who}.model_type: {model_type!r} is not one of {MODEL_TYPES}")
        if not 0.05 <= calibration_fraction <= 0.5:
            raise ValueError(f"{who}.calibration_fraction: must be in [0.05, 0.5], got {calibration_fraction!r}")
        make_calibrator(calibration)  # fails early, naming the known calibrators
        features = list(indicators) + [f"{c}_trend" for c in trend_indicators]
        for name, cols, known in (("categorical", categorical or (), list(indicators)),
                                  ("trend_indicators", trend_indicators, list(indicators)),
                                  ("actionable", actionable or (), features),
                                  ("healthy_values", healthy_values or {}, features)):
            unknown = [c for c in cols if c not in known]
            if unknown:
                raise ValueError(f"{who}.{name}: {unknown} are not among {known}")
        if trend_indicators and period_column is None:
            raise ValueError(f"{who}.trend_indicators: trends need each account's history; set period_column")
        if not warning_drop > 0:
            raise ValueError(f"{who}.warning_drop: must be > 0 health points, got {warning_drop!r}")
        super().__init__(model_name=model_name, feature_names=None, model_version=model_version, metadata=metadata)
        self.indicators = list(indicators)
        self.risk_thresholds = {k: float(v) for k, v in thresholds.items()}
        self.time_window = int(time_window)
        self.model_type = model_type
        self.id_column = id_column
        self.period_column = period_column
        self.categorical = None if categorical is None else list(categorical)
        self.trend_indicators = list(trend_indicators)
        self.actionable = list(self.features if actionable is None else actionable)
        self.action_texts = dict(action_texts or {})
        self.healthy_values = dict(healthy_values or {})
        self.calibration = calibration
        self.calibration_fraction = float(calibration_fraction)
        self.warning_drop = float(warning_drop)
        self.model_params = dict(model_params or {})
        self.random_state = int(random_state)
        self._fitted = False
        self._explainer: Any = None
        self._seen: pd.DataFrame | None = None  # feature rows of the accounts last scored, by id

    # ------------------------------------------------------------------ features
    @property
    def features(self) -> list[str]:
        """Model inputs in raw names: the indicators, then `<name>_trend` for each trend indicator."""
        return self.indicators + [f"{c}_trend" for c in self.trend_indicators]

    def _feature_frame(self, data: pd.DataFrame, who: str) -> pd.DataFrame:
        if not isinstance(data, pd.DataFrame):
            raise FeatureError(f"AccountHealthPredictor.{who}: account_data must be a pandas DataFrame with "
                               f"columns {self.indicators}, got {type(data).__name__}")
        missing = [c for c in self.indicators if c not in data.columns]
        if missing:
            raise FeatureError(f"AccountHealthPredictor.{who}: account_data lacks indicator columns {missing}; "
                               f"it needs {self.indicators}")
        out = data[self.indicators].copy()
        if self.trend_indicators:
            for col in (self.id_column, self.period_column):
                if col not in data.columns:
                    raise FeatureError(f"AccountHealthPredictor.{who}: trend_indicators need column '{col}' "
                                       f"(id_column / period_column) in account_data")
            order = np.lexsort((data[self.period_column].to_numpy(), data[self.id_column].astype(str).to_numpy()))
            ids = data[self.id_column].astype(str).to_numpy()[order]
            for c in self.trend_indicators:
                x = pd.to_numeric(data[c], errors="coerce").to_numpy(np.float64)[order]
                trend = np.empty(len(x))
                trend[order] = x - trailing_mean(x, ids, self.time_window)
                out[f"{c}_trend"] = trend
        return out

    def _ids(self, data: pd.DataFrame) -> np.ndarray:
        if self.id_column in data.columns:
            return data[self.id_column].astype(str).to_numpy()
        return data.index.astype(str).to_numpy()

    def _remember(self, data: pd.DataFrame, feats: pd.DataFrame) -> None:
        """Keep each account's latest feature row, so factors and actions can be asked for by id."""
        frame = feats.copy()
        frame["__id"] = self._ids(data)
        if self.period_column and self.period_column in data.columns:
            frame["__period"] = data[self.period_column].to_numpy()
            frame = frame.sort_values("__period", kind="stable")
        self._seen = frame.groupby("__id", sort=False).tail(1).set_index("__id")

    # ------------------------------------------------------------------ model
    def _margin(self, x: np.ndarray) -> np.ndarray:
        if self.model_type == "gbm":
            return np.asarray(self._booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)
        z = np.nan_to_num((x - self._x_mean) / self._x_scale)
        return z @ self._coef + self._intercept

    def _fit_model(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> None:
        if self.model_type == "gbm":
            import lightgbm as lgb

            params = {**GBM_PARAMS, "seed": self.random_state, **self.model_params}
            tr, es = _split(y, groups, 0.15, self.random_state + 1)
            probe = lgb.train(params, lgb.Dataset(x[tr], y[tr]), num_boost_round=GBM_MAX_ROUNDS,
                              valid_sets=[lgb.Dataset(x[es], y[es])],
                              callbacks=[lgb.early_stopping(GBM_EARLY_STOP, verbose=False)])
            self.n_rounds_ = int(probe.best_iteration or GBM_MAX_ROUNDS)
            self._booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=self.n_rounds_)
        else:
            from sklearn.linear_model import LogisticRegression

            self._x_mean = np.nanmean(x, axis=0)
            sd = np.nanstd(x, axis=0)
            self._x_scale = np.where(sd > 0, sd, 1.0)
            z = np.nan_to_num((x - self._x_mean) / self._x_scale)
            lr = LogisticRegression(**{"C": 1.0, "max_iter": 5000, **self.model_params}).fit(z, y)
            self._coef = lr.coef_.ravel().astype(np.float64)
            self._intercept = float(lr.intercept_[0])
        self._explainer = None

    def fit(self, X: pd.DataFrame, y: Any) -> AccountHealthPredictor:
        """Fit the churn model and its calibrator. y: 0/1 churn labels, or the name of X's label column."""
        y = X[y].to_numpy() if isinstance(y, str) else np.asarray(y)
        if y.shape != (len(X),):
            raise ValueError(f"AccountHealthPredictor.fit: y must be a 1-D array of len(X) = {len(X)}, got {y.shape}")
        if not np.isin(y, (0, 1)).all() or y.min() == y.max():
            raise ValueError("AccountHealthPredictor.fit: y must hold 0/1 churn labels with both classes present")
        y = y.astype(np.int64)
        feats = self._feature_frame(X, "fit")
        categorical = self.categorical
        if categorical is None:
            categorical = [c for c in self.indicators if not pd.api.types.is_numeric_dtype(feats[c])]
        self._encoder = _Encoder.fit(feats, categorical)
        x = self._encoder.transform(feats)
        ids = self._ids(X)
        groups = ids if self.id_column in X.columns and len(np.unique(ids)) < len(ids) else None
        fit_idx, cal_idx = _split(y, groups, self.calibration_fraction, self.random_state)
        self._fit_model(x[fit_idx], y[fit_idx], None if groups is None else groups[fit_idx])
        self._calibrator = make_calibrator(self.calibration).fit(self._margin(x[cal_idx]), y[cal_idx].astype(float))
        self._fitted = True
        self.feature_names = self.features
        p = self._calibrated(x)
        self._learn_evidence(feats, y, p)
        self.training_ = {"rows": len(y), "fit_rows": len(fit_idx), "calibration_rows": len(cal_idx),
                          "churn_rate": float(y.mean()), "split_by_account": groups is not None}
        self._remember(X, feats)
        return self

    def _calibrated(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._calibrator.transform(self._margin(x)), dtype=np.float64)

    def _learn_evidence(self, feats: pd.DataFrame, y: np.ndarray, p: np.ndarray) -> None:
        """Healthy value per feature (from the lowest-risk quarter) and training churn rates by value."""
        healthy_rows = p <= np.quantile(p, 0.25)
        self.healthy_, self.evidence_ = {}, {}
        for c in self.features:
            if c in self._encoder.categories:
                v = feats[c].astype(str)
                self.healthy_[c] = str(v[healthy_rows].mode().iloc[0])
                rate = pd.DataFrame({"v": v, "y": y}).groupby("v")["y"].agg(["mean", "size"])
                self.evidence_[c] = {"categories": rate.index.tolist(), "churn_rate": rate["mean"].tolist(),
                                     "rows": rate["size"].astype(int).tolist()}
            else:
                v = pd.to_numeric(feats[c]).to_numpy(np.float64)
                ok = np.isfinite(v)
                self.healthy_[c] = float(np.median(v[healthy_rows & ok]))
                edges = np.unique(np.quantile(v[ok], np.linspace(0, 1, EVIDENCE_BINS + 1)))
                b = np.clip(np.searchsorted(edges, v[ok], side="right") - 1, 0, max(len(edges) - 2, 0))
                n = np.bincount(b, minlength=max(len(edges) - 1, 1))
                k = np.bincount(b, weights=y[ok], minlength=len(n))
                self.evidence_[c] = {"edges": edges.tolist(), "churn_rate": (k / np.maximum(n, 1)).tolist(),
                                     "rows": n.astype(int).tolist()}
        self.healthy_.update(self.healthy_values)

    def _require_fitted(self, who: str) -> None:
        if not self._fitted:
            raise RuntimeError(f"AccountHealthPredictor.{who}: not fitted; call fit(X, y) or load(path) first")

    # ------------------------------------------------------------------ scoring
    def predict_churn_risk(self, account_data: pd.DataFrame) -> np.ndarray:
        """Calibrated churn probability per row of `account_data`."""
        self._require_fitted("predict_churn_risk")
        feats = self._feature_frame(account_data, "predict_churn_risk")
        self._remember(account_data, feats)
        return self._calibrated(self._encoder.transform(feats))

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.predict_churn_risk(X)

    def predict_health(self, account_data: pd.DataFrame) -> pd.DataFrame:
        """Per row: id (and period), churn_probability, health = 100 * (1 - churn_probability), risk_level."""
        p = self.predict_churn_risk(account_data)
        out = pd.DataFrame({self.id_column: self._ids(account_data)}, index=account_data.index)
        if self.period_column and self.period_column in account_data.columns:
            out[self.period_column] = account_data[self.period_column].to_numpy()
        health = 100.0 * (1.0 - p)
        out["churn_probability"] = p
        out["health"] = health
        out["risk_level"] = _risk_level(health, self.risk_thresholds)
        return out

    def early_warning(self, account_data: pd.DataFrame) -> pd.DataFrame:
        """Accounts whose health falls over their last `time_window` periods, worst first.

        Per account: the least-squares slope of health on period over its last `time_window` rows,
        `drop` = -slope * (periods spanned), `warning` = drop >= warning_drop (needs >= 2 periods).
        """
        self._require_fitted("early_warning")
        if not self.period_column or self.period_column not in account_data.columns:
            raise FeatureError(f"AccountHealthPredictor.early_warning: needs period_column "
                               f"({self.period_column!r}) in account_data to see a trend")
        h = self.predict_health(account_data).sort_values([self.id_column, self.period_column], kind="stable")
        last = h.groupby(self.id_column, sort=False).tail(self.time_window)
        t = last[self.period_column].to_numpy(np.float64)
        g = last.groupby(self.id_column, sort=False)
        tc = t - g[self.period_column].transform("mean").to_numpy(np.float64)
        hc = last["health"].to_numpy() - g["health"].transform("mean").to_numpy()
        stats = pd.DataFrame({self.id_column: last[self.id_column].to_numpy(), "sxy": tc * hc, "sxx": tc * tc,
                              "t": t, "health": last["health"].to_numpy(), "risk": last["risk_level"].to_numpy()})
        out = stats.groupby(self.id_column, sort=False).agg(
            periods=("t", "size"), sxy=("sxy", "sum"), sxx=("sxx", "sum"), t0=("t", "min"), t1=("t", "max"),
            health_first=("health", "first"), health_now=("health", "last"), risk_level=("risk", "last"))
        out["slope_per_period"] = (out["sxy"] / out["sxx"].where(out["sxx"] > 0)).fillna(0.0)
        out["drop"] = -out["slope_per_period"] * (out["t1"] - out["t0"])
        out["warning"] = (out["periods"] >= 2) & (out["drop"] >= self.warning_drop)
        out = out.drop(columns=["sxy", "sxx", "t0", "t1"]).reset_index()
        return out.sort_values("drop", ascending=False, kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ explanations
    def _row(self, account_id: Any, account_data: pd.DataFrame | None, who: str) -> pd.DataFrame:
        self._require_fitted(who)
        if account_data is not None:
            self._remember(account_data, self._feature_frame(account_data, who))
        key = str(account_id)
        if self._seen is None or key not in self._seen.index:
            raise KeyError(f"AccountHealthPredictor.{who}: account {account_id!r} has not been scored; call "
                           f"predict_health(account_data) with its rows first, or pass account_data=")
        return self._seen.loc[[key], self.features]

    def _shap(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        import shap

        if self._explainer is None:
            if self.model_type == "gbm":
                self._explainer = shap.TreeExplainer(self._booster)
            else:
                background = np.zeros((1, len(self._coef)))  # standardised training means
                self._explainer = shap.LinearExplainer((self._coef, self._intercept),
                                                       shap.maskers.Independent(background))
        z = x if self.model_type == "gbm" else np.nan_to_num((x - self._x_mean) / self._x_scale)
        with warnings.catch_warnings():  # shap notes a change of its LightGBM output format on every call
            warnings.simplefilter("ignore", UserWarning)
            values = np.asarray(self._explainer.shap_values(z), dtype=np.float64)
        if values.ndim == 3:  # older shap: one array per class
            values = values[-1]
        base = np.ravel(self._explainer.expected_value)[-1]
        return values.reshape(len(x), -1), float(base)

    def shap_values(self, account_data: pd.DataFrame) -> pd.DataFrame:
        """SHAP values (log-odds of the uncalibrated churn model) per row, one column per raw feature."""
        self._require_fitted("shap_values")
        feats = self._feature_frame(account_data, "shap_values")
        values, _ = self._shap(self._encoder.transform(feats))
        return self._by_feature(values, account_data.index)

    def _by_feature(self, values: np.ndarray, index: Any) -> pd.DataFrame:
        src = np.asarray(self._encoder.source)
        feats = self._encoder.numeric + list(self._encoder.categories)
        return pd.DataFrame({f: values[:, src == f].sum(axis=1) for f in feats}, index=index)[self.features]

    def get_contributing_factors(self, account_id: Any, account_data: pd.DataFrame | None = None) -> list[dict[str, Any]]:
        """The account's SHAP values by raw indicator, largest |value| first.

        Each entry: indicator, value, shap (log-odds of churn; > 0 raises risk), direction.
        The account's latest scored row is used (latest period in a panel).
        """
        row = self._row(account_id, account_data, "get_contributing_factors")
        values, _ = self._shap(self._encoder.transform(row))
        contrib = self._by_feature(values, row.index).iloc[0]
        order = np.argsort(-np.abs(contrib.to_numpy()), kind="stable")
        return [{"indicator": f, "value": _plain(row[f].iloc[0]), "shap": float(contrib[f]),
                 "direction": "raises churn risk" if contrib[f] > 0 else "lowers churn risk"}
                for f in contrib.index[order]]

    def recommend_actions(self, account_id: Any, account_data: pd.DataFrame | None = None,
                          max_actions: int = 3) -> list[dict[str, Any]]:
        """Actions for the account's risk-raising actionable factors, largest risk reduction first.

        Each: indicator, action, current, target (the healthy value), churn_risk_now / _after (the
        account re-scored with only that indicator moved), expected_effect (after - now, < 0), shap,
        and evidence (training churn rate and rows at the current and at the target value).
        """
        row = self._row(account_id, account_data, "recommend_actions")
        p_now = float(self._calibrated(self._encoder.transform(row))[0])
        factors = self.get_contributing_factors(account_id)
        out = []
        for f in factors:
            name = f["indicator"]
            if f["shap"] <= 0 or name not in self.actionable:
                continue
            target = self.healthy_[name]
            if _same(f["value"], target):
                continue
            moved = row.copy()
            moved[name] = target
            p_after = float(self._calibrated(self._encoder.transform(moved))[0])
            if p_after >= p_now:
                continue
            out.append({
                "indicator": name, "action": self._action_text(name, f["value"], target),
                "current": f["value"], "target": target, "churn_risk_now": p_now, "churn_risk_after": p_after,
                "expected_effect": p_after - p_now, "shap": f["shap"],
                "evidence": {"at_current": self._evidence_at(name, f["value"]),
                             "at_target": self._evidence_at(name, target)},
            })
        out.sort(key=lambda a: a["expected_effect"])
        return out[:max_actions]

    def _action_text(self, name: str, current: Any, target: Any) -> str:
        what = self.action_texts.get(name)
        if isinstance(target, str):
            move = f"move {name} from {current!r} to {target!r}"
        else:
            verb = "raise" if target > current else "lower"
            move = f"{verb} {name} from {current:.4g} to about {target:.4g}"
        return f"{what}: {move}" if what else move[0].upper() + move[1:]

    def _evidence_at(self, name: str, value: Any) -> dict[str, Any]:
        ev = self.evidence_[name]
        if "categories" in ev:
            if str(value) not in ev["categories"]:
                return {"churn_rate": None, "rows": 0, "where": f"{name} = {value!r} (not seen in training)"}
            i = ev["categories"].index(str(value))
            return {"churn_rate": ev["churn_rate"][i], "rows": ev["rows"][i], "where": f"{name} = {value!r}"}
        edges = ev["edges"]
        i = int(np.clip(np.searchsorted(edges, float(value), side="right") - 1, 0, max(len(edges) - 2, 0)))
        hi = edges[min(i + 1, len(edges) - 1)]
        return {"churn_rate": ev["churn_rate"][i], "rows": ev["rows"][i],
                "where": f"{edges[i]:.4g} <= {name} <= {hi:.4g} (training decile)"}

    # ------------------------------------------------------------------ persistence
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted("save")
        if self.model_type == "gbm":
            arrays = {"booster": np.frombuffer(self._booster.model_to_string().encode("utf-8"), dtype=np.uint8)}
        else:
            arrays = {"coef": self._coef, "intercept": np.array([self._intercept]),
                      "x_mean": self._x_mean, "x_scale": self._x_scale}
        config = {
            "params": {"indicators": self.indicators, "risk_thresholds": self.risk_thresholds,
                       "time_window": self.time_window, "model_type": self.model_type,
                       "id_column": self.id_column, "period_column": self.period_column,
                       "categorical": self.categorical, "trend_indicators": self.trend_indicators,
                       "actionable": self.actionable, "action_texts": self.action_texts,
                       "healthy_values": self.healthy_values,
                       "calibration": self.calibration, "calibration_fraction": self.calibration_fraction,
                       "warning_drop": self.warning_drop, "model_params": self.model_params,
                       "random_state": self.random_state},
            "encoder": self._encoder.to_dict(), "calibrator": self._calibrator.to_dict(),
            "healthy": self.healthy_, "evidence": self.evidence_, "training": self.training_,
            "n_rounds": getattr(self, "n_rounds_", None),
        }
        return arrays, config

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> AccountHealthPredictor:
        try:
            model = cls(**config["params"])
            model._encoder = _Encoder(list(config["encoder"]["numeric"]), dict(config["encoder"]["categories"]))
            model._calibrator = calibrator_from_dict(config["calibrator"])
            model.healthy_, model.evidence_ = config["healthy"], config["evidence"]
            model.training_, model.n_rounds_ = config["training"], config.get("n_rounds")
            if model.model_type == "gbm":
                import lightgbm as lgb

                model._booster = lgb.Booster(model_str=arrays["booster"].tobytes().decode("utf-8"))
            else:
                model._coef, model._x_mean, model._x_scale = arrays["coef"], arrays["x_mean"], arrays["x_scale"]
                model._intercept = float(arrays["intercept"][0])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"AccountHealthPredictor: saved state is incomplete or corrupt ({type(err).__name__}: {err})") from err
        if len(model._encoder.columns) != (model._booster.num_feature() if model.model_type == "gbm" else len(model._coef)):
            raise BundleError("AccountHealthPredictor: the saved encoder and model disagree on the number of columns")
        model._fitted = True
        return model


def _split(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held-out) row indices: stratified by label, or by group (all rows of an id on one side)."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    idx = np.arange(len(y))
    if groups is None:
        a, b = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    else:
        a, b = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(idx, y, groups))
    if y[b].min() == y[b].max() or y[a].min() == y[a].max():
        raise ValueError(f"AccountHealthPredictor.fit: a {fraction:.0%} held-out split has one class only; "
                         f"give more rows (got {len(y)}, {int(y.sum())} churned)")
    return np.sort(a), np.sort(b)


def _plain(v: Any) -> Any:
    """numpy scalars as Python ones, so factors and actions are JSON-serialisable."""
    return v.item() if isinstance(v, np.generic) else v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    return bool(np.isclose(float(a), float(b)))


__all__ = ["DEFAULT_RISK_THRESHOLDS", "MODEL_TYPES", "AccountHealthPredictor"]
