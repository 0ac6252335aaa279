"""DynamicLinear: online logistic regression on hashed sparse features, trained by FTRL-Proximal.

FTRL-Proximal is McMahan et al., "Ad click prediction: a view from the trenches" (KDD 2013),
Algorithm 1, with per-coordinate learning rates eta_i = alpha / (beta + sqrt(n_i)). Features are
hashed with sklearn's `FeatureHasher` (Weinberger et al., "Feature hashing for large scale
multitask learning", ICML 2009).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import expit

from within.models.base import BaseMLModel, BundleError, register_model

REGULARIZATIONS = ("l1", "l2", "elastic", "none")
NUMERIC_TRANSFORMS = ("none", "signed_log1p")
_HYPERPARAMETERS = (
    "n_features", "regularization", "alpha", "beta", "l1", "l2", "time_decay", "batch_size", "epochs",
    "history_size", "history_top_k", "history_every", "tracked_features",
)


class HashingFeaturizer:
    """DataFrame -> CSR of hashed features, with a JSON config so a saved model can featurise raw rows.

    Categorical column c with value v -> a one at hash("c=v") (values hashed by `str(v)`,
    missing -> "c=__missing__"). Numeric column c -> (t(x) - mean_c) / std_c at hash("c"),
    with t = identity or signed log1p, and mean/std learned by `fit`; a missing numeric becomes
    0 (the mean) plus a one at hash("c=__missing__"). Collisions inside a row add up, as in
    FeatureHasher. Text column c -> a bag of words, 1/len(words) at each hash("c:word").
    Hashing runs once per distinct value, not per row.
    """

    def __init__(
        self,
        categorical: Sequence[str] = (),
        numeric: Sequence[str] = (),
        n_features: int = 2**18,
        numeric_transform: str = "signed_log1p",
        text: Sequence[str] = (),
    ) -> None:
        categorical, numeric, text = list(categorical), list(numeric), list(text)
        if not categorical and not numeric and not text:
            raise ValueError("HashingFeaturizer needs at least one column in categorical=, numeric= or text=")
        kinds = categorical + numeric + text
        overlap = {c for c in kinds if kinds.count(c) > 1}
        if overlap:
            raise ValueError(f"columns {sorted(overlap)} are listed under more than one of categorical/numeric/text; pick one")
        if not isinstance(n_features, int) or n_features < 2:
            raise ValueError(f"n_features must be an int >= 2, got {n_features!r}")
        if numeric_transform not in NUMERIC_TRANSFORMS:
            raise ValueError(f"numeric_transform={numeric_transform!r}; choose one of {NUMERIC_TRANSFORMS}")
        self.categorical = categorical
        self.numeric = numeric
        self.text = text
        self.n_features = n_features
        self.numeric_transform = numeric_transform
        self.mean: dict[str, float] | None = None
        self.std: dict[str, float] | None = None

    @property
    def fitted(self) -> bool:
        return not self.numeric or self.mean is not None

    def _hash(self, tokens: Sequence[str]) -> np.ndarray:
        from sklearn.feature_extraction import FeatureHasher

        hasher = FeatureHasher(n_features=self.n_features, input_type="string", alternate_sign=False)
        return hasher.transform([[t] for t in tokens]).indices.astype(np.int64)

    def _numeric(self, df: pd.DataFrame, col: str) -> np.ndarray:
        try:
            x = pd.to_numeric(df[col], errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as err:
            raise ValueError(f"numeric column {col!r} holds non-numeric values ({err})") from err
        if self.numeric_transform == "signed_log1p":
            x = np.sign(x) * np.log1p(np.abs(x))
        return x

    def _check_columns(self, df: pd.DataFrame) -> None:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"HashingFeaturizer takes a pandas DataFrame, got {type(df).__name__}")
        missing = [c for c in self.categorical + self.numeric + self.text if c not in df.columns]
        if missing:
            raise ValueError(f"DataFrame lacks columns {missing} that the featurizer was configured with")

    def fit(self, df: pd.DataFrame) -> HashingFeaturizer:
        self._check_columns(df)
        self.mean, self.std = {}, {}
        for col in self.numeric:
            x = self._numeric(df, col)
            finite = x[np.isfinite(x)]
            self.mean[col] = float(finite.mean()) if finite.size else 0.0
            sd = float(finite.std()) if finite.size else 0.0
            self.std[col] = sd if sd > 0 else 1.0
        return self

    def transform(self, df: pd.DataFrame) -> sp.csr_matrix:
        self._check_columns(df)
        if not self.fitted:
            raise ValueError("HashingFeaturizer has numeric columns but is not fitted; call fit(df) first")
        n = len(df)
        rows, cols, vals = [], [], []
        all_rows = np.arange(n, dtype=np.int64)
        for col in self.categorical:
            codes, uniques = pd.factorize(df[col], use_na_sentinel=True)
            tokens = [f"{col}={v}" for v in uniques] + [f"{col}=__missing__"]
            table = self._hash(tokens)
            rows.append(all_rows)
            cols.append(table[codes])  # code -1 (missing) picks the last token
            vals.append(np.ones(n))
        for col in self.text:
            r, c, v = self._text(df[col], col)
            rows.append(r)
            cols.append(c)
            vals.append(v)
        if self.numeric:
            num_idx = self._hash(self.numeric)
            miss_idx = self._hash([f"{c}=__missing__" for c in self.numeric])
        for j, col in enumerate(self.numeric):
            x = (self._numeric(df, col) - self.mean[col]) / self.std[col]
            bad = ~np.isfinite(x)
            x[bad] = 0.0
            rows.append(all_rows)
            cols.append(np.full(n, num_idx[j]))
            vals.append(x)
            if bad.any():
                rows.append(all_rows[bad])
                cols.append(np.full(int(bad.sum()), miss_idx[j]))
                vals.append(np.ones(int(bad.sum())))
        X = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, self.n_features)
        )
        X.sum_duplicates()
        return X

    def _text(self, column: pd.Series, col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bag of words: "col:word" tokens (lower-cased, whitespace split), each 1/len(words) so a
        field's weights are averaged like the NN's mean-pooled text. Hashed once per distinct text."""
        from sklearn.feature_extraction import FeatureHasher

        codes, uniques = pd.factorize(column, use_na_sentinel=True)
        docs = [[f"{col}:{w}" for w in str(t).lower().split()] for t in uniques]
        hasher = FeatureHasher(n_features=self.n_features, input_type="string", alternate_sign=False)
        U = hasher.transform(docs + [[]]).tocsr()  # last row: missing text -> no tokens
        sizes = np.array([max(len(d), 1) for d in docs] + [1], dtype=np.float64)
        U = sp.diags(1.0 / sizes) @ U
        X = U.tocsr()[codes]
        coo = X.tocoo()
        return coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data

    def fit_transform(self, df: pd.DataFrame) -> sp.csr_matrix:
        return self.fit(df).transform(df)

    def to_dict(self) -> dict[str, Any]:
        return {
            "categorical": self.categorical,
            "numeric": self.numeric,
            "n_features": self.n_features,
            "numeric_transform": self.numeric_transform,
            "text": self.text,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HashingFeaturizer:
        f = cls(d["categorical"], d["numeric"], int(d["n_features"]), d["numeric_transform"], d.get("text", []))
        if d.get("mean") is not None:
            f.mean = {k: float(v) for k, v in d["mean"].items()}
            f.std = {k: float(v) for k, v in d["std"].items()}
        return f


@register_model
class DynamicLinear(BaseMLModel):
    """Online logistic regression over hashed sparse features, trained with FTRL-Proximal.

    Per coordinate i (McMahan et al. 2013, Algorithm 1), with gradient g_i:
        w_i = 0                                                   if |z_i| <= l1
        w_i = -(z_i - sign(z_i) * l1) / ((beta + sqrt(n_i)) / alpha + l2)   otherwise
        sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha;  z_i += g_i - sigma_i * w_i;  n_i += g_i^2
    `regularization` picks which penalties apply: 'l1' (l2 ignored), 'l2' (l1 ignored),
    'elastic' (both), 'none'. The intercept is an unpenalised extra coordinate.

    Minibatch variant (for speed): rows are processed `batch_size` at a time; all rows of a
    batch are scored with the same w, then each touched coordinate gets the summed per-row
    gradients added to z and the summed squared per-row gradients to n. This is exactly
    Algorithm 1 if w didn't move within the batch. Regularisation strengths are therefore on
    the scale of summed (not averaged) gradients, as in the paper.

    `time_decay` (>= 0): before each batch, all FTRL state (z, n) is multiplied by
    exp(-time_decay), so evidence from k batches ago counts exp(-k * time_decay) as much as
    new evidence (and forgotten coordinates get larger step sizes again). With decay each
    batch also touches every coordinate (O(n_features)), so it is slower than without.

    Coefficient history: every `history_every` batches, the `history_top_k` largest |w| and the
    weights of `tracked_features` are recorded, keeping the last `history_size` records.
    """

    def __init__(
        self,
        n_features: int = 2**18,
        regularization: str = "elastic",
        alpha: float = 0.1,
        beta: float = 1.0,
        l1: float = 1.0,
        l2: float = 1.0,
        time_decay: float = 0.0,
        batch_size: int = 1024,
        epochs: int = 1,
        history_size: int = 100,
        history_top_k: int = 10,
        history_every: int = 20,
        tracked_features: Sequence[int] = (),
        featurizer: HashingFeaturizer | None = None,
        model_name: str = "dynamic_linear",
        feature_names: list[str] | None = None,
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model_name, feature_names, model_version, metadata)
        if not isinstance(n_features, (int, np.integer)) or n_features < 1:
            raise ValueError(f"n_features must be a positive int (the hashing space), got {n_features!r}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization={regularization!r}; choose one of {REGULARIZATIONS}")
        for name, v, ok in (
            ("alpha", alpha, alpha > 0),
            ("beta", beta, beta >= 0),
            ("l1", l1, l1 >= 0),
            ("l2", l2, l2 >= 0),
            ("time_decay", time_decay, time_decay >= 0),
        ):
            if not (ok and math.isfinite(v)):
                raise ValueError(f"{name} must be finite and {'> 0' if name == 'alpha' else '>= 0'}, got {v!r}")
        for name, v, low in (
            ("batch_size", batch_size, 1),
            ("epochs", epochs, 1),
            ("history_size", history_size, 1),
            ("history_top_k", history_top_k, 0),
            ("history_every", history_every, 1),
        ):
            if not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if featurizer is not None and featurizer.n_features != n_features:
            raise ValueError(
                f"featurizer.n_features={featurizer.n_features} differs from n_features={n_features}; "
                "build both with the same hashing space"
            )
        self.n_features = int(n_features)
        self.regularization = regularization
        self.alpha, self.beta = float(alpha), float(beta)
        self.l1, self.l2 = float(l1), float(l2)
        self.time_decay = float(time_decay)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.history_size = int(history_size)
        self.history_top_k = int(history_top_k)
        self.history_every = int(history_every)
        self.tracked_features = self._check_indices(tracked_features, "tracked_features")
        self.featurizer = featurizer
        # optional: a fitted calibrator (within.calibration) applied to the logits by `predict`,
        # fed the raw values of `calibration_columns` as its groups
        self.calibrator: Any = None
        self.calibration_columns: list[str] = []
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    @property
    def _l1(self) -> float:
        return self.l1 if self.regularization in ("l1", "elastic") else 0.0

    @property
    def _l2(self) -> float:
        return self.l2 if self.regularization in ("l2", "elastic") else 0.0

    def reset(self) -> DynamicLinear:
        """Forget everything learned (z, n, w, intercept, history); keep hyperparameters."""
        d = self.n_features
        self._z = np.zeros(d)
        self._n = np.zeros(d)
        self._w = np.zeros(d)
        self._bias = np.zeros(3)  # z, n, w of the intercept
        self._slot = np.empty(d, dtype=np.int64)  # scratch for O(nnz) dedup of column indices
        self.n_updates = 0
        self.rows_seen = 0
        self._history: deque = deque(maxlen=self.history_size)
        return self

    def _weights(self, z: np.ndarray, n: np.ndarray) -> np.ndarray:
        l1 = self._l1
        denom = (self.beta + np.sqrt(n)) / self.alpha + self._l2
        w = -(z - np.sign(z) * l1) / denom
        w[np.abs(z) <= l1] = 0.0
        return w

    def _check_indices(self, indices: Any, name: str) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).ravel() if len(indices) else np.zeros(0, np.int64)
        bad = idx[(idx < 0) | (idx >= self.n_features)]
        if bad.size:
            raise ValueError(f"{name} has indices {bad[:5].tolist()} outside [0, n_features={self.n_features})")
        return idx

    # ---- input -------------------------------------------------------------------------------
    def attach_featurizer(self, featurizer: HashingFeaturizer) -> DynamicLinear:
        if featurizer.n_features != self.n_features:
            raise ValueError(
                f"featurizer.n_features={featurizer.n_features} differs from n_features={self.n_features}"
            )
        self.featurizer = featurizer
        return self

    def _as_csr(self, X: Any, fit_featurizer: bool = False) -> sp.csr_matrix:
        if isinstance(X, pd.DataFrame):
            if self.featurizer is None:
                raise ValueError(
                    "got a DataFrame but no featurizer is attached; pass featurizer=HashingFeaturizer(...) "
                    "or give a scipy.sparse CSR matrix"
                )
            if fit_featurizer or not self.featurizer.fitted:
                self.featurizer.fit(X)
            return self.featurizer.transform(X)
        if sp.issparse(X):
            X = X.tocsr()
        elif isinstance(X, np.ndarray) and X.ndim == 2:
            X = sp.csr_matrix(X)
        else:
            raise TypeError(f"X must be a scipy.sparse matrix, a 2-D ndarray or a DataFrame, got {type(X).__name__}")
        if X.shape[1] != self.n_features:
            raise ValueError(
                f"X has {X.shape[1]} columns but the model has n_features={self.n_features}; "
                "hash into the same space"
            )
        if X.dtype != np.float64:
            X = X.astype(np.float64)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        return X

    @staticmethod
    def _check_target(y: Any, n: int, sample_weight: Any) -> tuple[np.ndarray, np.ndarray | None]:
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} labels for {n} rows of X")
        if not (np.all(y >= 0.0) and np.all(y <= 1.0)):
            raise ValueError("y must hold labels in [0, 1] (clicks as 0/1), and no NaN")
        if sample_weight is None:
            return y, None
        sw = np.asarray(sample_weight, dtype=np.float64).ravel()
        if sw.shape[0] != n:
            raise ValueError(f"sample_weight has {sw.shape[0]} entries for {n} rows of X")
        if not (np.all(sw >= 0.0) and np.all(np.isfinite(sw))):
            raise ValueError("sample_weight must be finite and >= 0")
        return y, sw

    # ---- training ----------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> DynamicLinear:
        """Reset, then `epochs` in-order passes of `fit_incremental`."""
        self.reset()
        X = self._as_csr(X, fit_featurizer=True)
        for _ in range(self.epochs):
            self.fit_incremental(X, y, sample_weight)
        return self

    def fit_incremental(self, X: Any, y: Any, sample_weight: Any = None) -> DynamicLinear:
        """Continue training on new rows, in order, `batch_size` rows per FTRL step.

        Works on a freshly loaded model too: load -> fit_incremental(new rows) -> save.
        A DataFrame is featurised by the attached featurizer (fitted on this data if unfitted).
        """
        X = self._as_csr(X)
        y, sw = self._check_target(y, X.shape[0], sample_weight)
        indptr, indices, data = X.indptr, X.indices, X.data
        for start in range(0, X.shape[0], self.batch_size):
            stop = min(start + self.batch_size, X.shape[0])
            a, b = indptr[start], indptr[stop]
            self._step(
                indptr[start : stop + 1] - a,
                indices[a:b],
                data[a:b],
                y[start:stop],
                None if sw is None else sw[start:stop],
            )
        return self

    def _step(self, indptr, cols, vals, y, sw) -> None:
        if self.time_decay > 0.0:
            keep = math.exp(-self.time_decay)
            self._z *= keep
            self._n *= keep
            self._bias[:2] *= keep
            self._w = self._weights(self._z, self._n)
            self._bias[2] = self._bias_weight()
        n_rows = len(indptr) - 1
        rows = np.repeat(np.arange(n_rows), np.diff(indptr))
        margin = np.bincount(rows, weights=vals * self._w[cols], minlength=n_rows) + self._bias[2]
        resid = expit(margin) - y
        if sw is not None:
            resid *= sw
        g = vals * resid[rows]
        # Unique columns in O(nnz), no sort: the last write per column marks its representative.
        pos = np.arange(cols.size)
        self._slot[cols] = pos
        rep = self._slot[cols]
        is_rep = rep == pos
        uniq = cols[is_rep]
        inv = (np.cumsum(is_rep) - 1)[rep]
        G = np.bincount(inv, weights=g, minlength=uniq.size)
        G2 = np.bincount(inv, weights=g * g, minlength=uniq.size)
        n_old = self._n[uniq]
        n_new = n_old + G2
        sigma = (np.sqrt(n_new) - np.sqrt(n_old)) / self.alpha
        z_new = self._z[uniq] + G - sigma * self._w[uniq]
        self._z[uniq] = z_new
        self._n[uniq] = n_new
        self._w[uniq] = self._weights(z_new, n_new)
        # Intercept: always-on coordinate, unpenalised.
        gb, gb2 = resid.sum(), (resid * resid).sum()
        nb_new = self._bias[1] + gb2
        self._bias[0] += gb - (math.sqrt(nb_new) - math.sqrt(self._bias[1])) / self.alpha * self._bias[2]
        self._bias[1] = nb_new
        self._bias[2] = self._bias_weight()
        self.n_updates += 1
        self.rows_seen += n_rows
        if self.n_updates % self.history_every == 0:
            self._record_history()

    def _bias_weight(self) -> float:
        return -self._bias[0] / ((self.beta + math.sqrt(self._bias[1])) / self.alpha)

    # ---- inference ---------------------------------------------------------------------------
    def decision_function(self, X: Any) -> np.ndarray:
        """Logits x . w + b."""
        X = self._as_csr(X)
        return np.asarray(X @ self._w, dtype=np.float64) + self._bias[2]

    def predict(self, X: Any) -> np.ndarray:
        """Click probabilities for CSR rows, or for a DataFrame when a featurizer is attached;
        calibrated when a calibrator is set (group-keyed calibrators need a DataFrame)."""
        logits = self.decision_function(X)
        if self.calibrator is None:
            return expit(logits)
        groups = None
        if isinstance(X, pd.DataFrame) and self.calibration_columns:
            groups = {c: X[c].to_numpy() for c in self.calibration_columns if c in X.columns} or None
        return np.asarray(self.calibrator.transform(logits, groups=groups), dtype=np.float64)

    @property
    def intercept(self) -> float:
        return float(self._bias[2])

    def get_coefficients(self, as_dict: bool = False) -> np.ndarray | dict[int, float]:
        """Weights over the hashing space: a dense copy, or {index: weight} of the nonzeros."""
        if as_dict:
            nz = np.flatnonzero(self._w)
            return dict(zip(nz.tolist(), self._w[nz].tolist()))
        return self._w.copy()

    # ---- surgery -----------------------------------------------------------------------------
    def sparsify(self, threshold: float = 1e-3) -> int:
        """Zero every weight with |w| < threshold; return how many nonzero weights were removed.

        Sets z_i = 0 (so w_i stays 0 until new evidence arrives) and keeps n_i, the coordinate's
        learning-rate history.
        """
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        drop = (self._w != 0.0) & (np.abs(self._w) < threshold)
        self._z[drop] = 0.0
        self._w[drop] = 0.0
        return int(drop.sum())

    def reset_features(self, indices: Sequence[int] | np.ndarray) -> None:
        """Reset exactly these coordinates (z, n, w = 0), e.g. after a hashed field is repurposed."""
        idx = self._check_indices(indices, "indices")
        self._z[idx] = 0.0
        self._n[idx] = 0.0
        self._w[idx] = 0.0

    # ---- interpretability --------------------------------------------------------------------
    def _record_history(self) -> None:
        k = min(self.history_top_k, self.n_features)
        top = np.argpartition(-np.abs(self._w), k - 1)[:k] if k else np.zeros(0, np.int64)
        idx = np.concatenate([top, self.tracked_features]).astype(np.int64)
        self._history.append((self.n_updates, self.rows_seen, idx, self._w[idx].copy()))

    def coefficient_history(self) -> list[dict[str, Any]]:
        """Oldest-first records: {"update", "rows_seen", "weights": {index: w}} (top-k |w| + tracked)."""
        return [
            {"update": u, "rows_seen": r, "weights": dict(zip(i.tolist(), v.tolist()))}
            for u, r, i, v in self._history
        ]

    # ---- persistence -------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        config = {k: getattr(self, k) for k in _HYPERPARAMETERS}
        config["tracked_features"] = self.tracked_features.tolist()
        return config

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        width = self.history_top_k + self.tracked_features.size
        h = list(self._history)
        arrays = {
            "z": self._z,
            "n": self._n,
            "w": self._w,
            "bias": self._bias,
            "history_counts": np.array([[u, r] for u, r, _, _ in h], dtype=np.int64).reshape(-1, 2),
            "history_index": np.array([i for _, _, i, _ in h], dtype=np.int64).reshape(-1, width),
            "history_weight": np.array([v for _, _, _, v in h], dtype=np.float64).reshape(-1, width),
        }
        config = self._config()
        config.update(
            n_updates=self.n_updates,
            rows_seen=self.rows_seen,
            featurizer=None if self.featurizer is None else self.featurizer.to_dict(),
            calibrator=None if self.calibrator is None else self.calibrator.to_dict(),
            calibration_columns=list(self.calibration_columns),
        )
        return arrays, config

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> DynamicLinear:
        try:
            featurizer = None if config.get("featurizer") is None else HashingFeaturizer.from_dict(config["featurizer"])
            hyper = {k: config[k] for k in _HYPERPARAMETERS}
            model = cls(**hyper, featurizer=featurizer)
            n_updates, rows_seen = int(config["n_updates"]), int(config["rows_seen"])
            if config.get("calibrator") is not None:
                from within.calibration import calibrator_from_dict

                model.calibrator = calibrator_from_dict(config["calibrator"])
            model.calibration_columns = [str(c) for c in config.get("calibration_columns") or []]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(f"metadata.json config is not a valid DynamicLinear config ({err!r})") from err
        d = model.n_features
        width = model.history_top_k + model.tracked_features.size
        expected = {"z": (d,), "n": (d,), "w": (d,), "bias": (3,)}
        for key, shape in expected.items():
            if key not in arrays or arrays[key].shape != shape:
                got = None if key not in arrays else arrays[key].shape
                raise BundleError(f"model.safetensors: array {key!r} has shape {got}, config says {shape}")
        hc, hi, hw = (arrays.get(k) for k in ("history_counts", "history_index", "history_weight"))
        if hc is None or hi is None or hw is None or hi.shape != hw.shape or hi.shape[:1] != hc.shape[:1] or (
            hi.size and hi.shape[1] != width
        ):
            raise BundleError("model.safetensors: coefficient history arrays are missing or inconsistent")
        if not (np.all(np.isfinite(arrays["z"])) and np.all(arrays["n"] >= 0)):
            raise BundleError("model.safetensors: z must be finite and n >= 0")
        model._z = arrays["z"].astype(np.float64)
        model._n = arrays["n"].astype(np.float64)
        model._w = model._weights(model._z, model._n)
        if not np.allclose(model._w, arrays["w"], rtol=1e-9, atol=1e-12):
            raise BundleError("model.safetensors: stored w does not follow from z, n and the config's FTRL settings")
        model._bias = arrays["bias"].astype(np.float64)
        model.n_updates, model.rows_seen = n_updates, rows_seen
        for (u, r), i, v in zip(hc.tolist(), hi, hw):
            model._history.append((int(u), int(r), i.astype(np.int64), v.astype(np.float64)))
        return model
