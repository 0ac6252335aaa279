"""DynamicLinear: online logistic regression on hashed sparse features, trained by FTRL-Proximal.

FTRL-Proximal is McMahan et al., "Ad click prediction: a view from the trenches" (KDD 2013),
Algorithm 1, with per-coordinate learning rates learning_rate / (beta + sqrt(n_i)); the penalty
`alpha` is per row, as sklearn's SGDClassifier alpha is. Features are hashed with sklearn's
`FeatureHasher` (Weinberger et al., "Feature hashing for large scale multitask learning", ICML 2009).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import expit, log_expit

from within.features.spec import FeatureSpec
from within.models.base import BaseMLModel, BundleError, register_model
from within.models.scoring import CalibratedScoring, calibration_from_dict

REGULARIZATIONS = ("l1", "l2", "elastic", "none")
NUMERIC_TRANSFORMS = ("none", "signed_log1p")
_HYPERPARAMETERS = (
    "n_features", "regularization", "alpha", "time_decay", "l1_ratio", "learning_rate", "beta", "alpha_grid",
    "batch_size", "epochs", "history_size", "history_top_k", "history_every", "tracked_features",
)
# candidate penalties per row for alpha="auto": LogisticRegression's default C=1 is 1/N, so 1e-7..1e-3
# spans streams of ten million rows down to a thousand
DEFAULT_ALPHA_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
STATE_FORMAT = 2  # 1 (no "format" key): alpha was FTRL's learning rate, l1/l2 fixed totals


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
class DynamicLinear(CalibratedScoring, BaseMLModel):
    """Online logistic regression over hashed sparse features: FTRL-Proximal with a per-row penalty.

    The objective after rows 1..t (weights c_i = sample weights, 1 by default, each multiplied
    by `time_decay` once per row that arrived after it) is the weighted mean log loss plus
    sklearn's penalty (SGDClassifier / ElasticNet convention):

        (1 / sum_i c_i) * sum_i c_i * logloss_i(w)  +  alpha * R(w)
        R(w) = l1_ratio * ||w||_1 + (1 - l1_ratio) / 2 * ||w||_2^2

    `regularization` picks R: 'l1' (l1_ratio = 1), 'l2' (l1_ratio = 0), 'elastic' (`l1_ratio`),
    'none' (no penalty; alpha is ignored). Because alpha is per unit of row weight, the same alpha
    means the same thing at any batch size and stream length: on N rows, LogisticRegression(C=c)
    with an l2 penalty is alpha = 1 / (c * N) with regularization='l2'. The intercept is unpenalised.

    Training is FTRL-Proximal (McMahan et al., KDD 2013, Algorithm 1) with the penalty kept exactly
    in the closed-form step rather than linearised (composite-objective FTRL, McMahan, AISTATS
    2011): with S = sum_i c_i the (decayed) row weight seen so far, per coordinate
        lambda1 = alpha * l1_ratio * S,   lambda2 = alpha * (1 - l1_ratio) * S
        w_i = 0                                                            if |z_i| <= lambda1
        w_i = -(z_i - sign(z_i) lambda1) / ((beta + sqrt(n_i)) / learning_rate + lambda2)  otherwise
        sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / learning_rate;  z_i += g_i - sigma_i w_i;  n_i += g_i^2
    so the per-coordinate step is learning_rate / (beta + sqrt(n_i)). The default learning_rate=0.1,
    beta=1 suits unscaled 0/1 (one-hot) features. Rows are processed `batch_size` at a time: all
    rows of a batch are scored with the same w, then each touched coordinate gets the batch's
    summed gradients in z and summed squared per-row gradients in n (exactly Algorithm 1 if w did
    not move within the batch).

    `time_decay` in (0, 1] is the decay factor for temporal weighting, per row: a row that arrived
    k rows ago (counting inside a batch too) weighs time_decay**k as much as the newest (half-life ln 2 / -ln(time_decay) rows;
    time_decay = 0.5 ** (1 / half_life_rows)). 1.0 = no forgetting. z, n, S and the progressive
    losses all decay together, so forgotten coordinates get larger steps again. With decay each
    batch touches every coordinate (O(n_features)), so it is slower per batch than without.

    Adaptive regularisation (`alpha="auto"`): one model per value of `alpha_grid` is trained side by
    side on the same rows, each batch is scored by every candidate before it trains on it
    (progressive validation, Blum et al. 1999), and predictions come from the candidate with the
    least (decayed) progressive log loss so far (ties: the larger alpha). `alpha_` is the current
    choice, `alpha_scores()` every candidate's loss. `fit` scores only its first pass (later passes
    have seen the rows); pass `fit_incremental(..., score=False)` when repeating rows yourself.

    Coefficient history: every `history_every` batches the `history_top_k` largest |w| and the
    weights of `tracked_features` are recorded, keeping the last `history_size` records.
    """

    def __init__(
        self,
        n_features: int = 2**18,
        regularization: str = "elastic",
        alpha: float | str = 1e-5,
        time_decay: float = 1.0,
        l1_ratio: float = 0.15,
        learning_rate: float = 0.1,
        beta: float = 1.0,
        alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
        batch_size: int = 1024,
        epochs: int = 1,
        history_size: int = 100,
        history_top_k: int = 10,
        history_every: int = 20,
        tracked_features: Sequence[int] = (),
        featurizer: HashingFeaturizer | None = None,
        spec: FeatureSpec | None = None,
        model_name: str = "dynamic_linear",
        feature_names: list[str] | None = None,
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model_name, feature_names, model_version, metadata)
        if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or n_features < 1:
            raise ValueError(f"DynamicLinear.n_features: must be a positive int (the hashing space), got {n_features!r}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"DynamicLinear.regularization: {regularization!r} is not one of {REGULARIZATIONS}")
        if isinstance(alpha, str):
            if alpha != "auto":
                raise ValueError(f"DynamicLinear.alpha: a penalty >= 0 or 'auto', got {alpha!r}")
            if regularization == "none":
                raise ValueError("DynamicLinear.alpha='auto' chooses a penalty strength, but regularization='none' "
                                 "has no penalty; pick regularization='l1', 'l2' or 'elastic'")
        elif not _finite_at_least(alpha, 0.0):
            raise ValueError(f"DynamicLinear.alpha: the penalty per row must be finite and >= 0 (or 'auto'), got {alpha!r}")
        grid = sorted({float(a) for a in alpha_grid}) if not isinstance(alpha_grid, str) else []
        if not grid or not all(math.isfinite(a) and a >= 0 for a in grid):
            raise ValueError(f"DynamicLinear.alpha_grid: needs at least one finite alpha >= 0, got {alpha_grid!r}")
        if not (_finite_at_least(time_decay, 0.0) and 0.0 < time_decay <= 1.0):
            raise ValueError(f"DynamicLinear.time_decay: a per-row decay factor in (0, 1] (1.0 = no forgetting), "
                             f"got {time_decay!r}")
        if not (_finite_at_least(l1_ratio, 0.0) and l1_ratio <= 1.0):
            raise ValueError(f"DynamicLinear.l1_ratio: must be in [0, 1], got {l1_ratio!r}")
        if not (_finite_at_least(learning_rate, 0.0) and learning_rate > 0):
            raise ValueError(f"DynamicLinear.learning_rate: must be finite and > 0 (e.g. 0.1), got {learning_rate!r}")
        if not _finite_at_least(beta, 0.0):
            raise ValueError(f"DynamicLinear.beta: must be finite and >= 0, got {beta!r}")
        for name, v, low in (
            ("batch_size", batch_size, 1),
            ("epochs", epochs, 1),
            ("history_size", history_size, 1),
            ("history_top_k", history_top_k, 0),
            ("history_every", history_every, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"DynamicLinear.{name}: must be an int >= {low}, got {v!r}")
        if featurizer is not None and featurizer.n_features != n_features:
            raise ValueError(
                f"DynamicLinear.featurizer: n_features={featurizer.n_features} differs from n_features={n_features}; "
                "build both with the same hashing space"
            )
        self.n_features = int(n_features)
        self.regularization = regularization
        self.alpha: float | str = alpha if isinstance(alpha, str) else float(alpha)
        self.time_decay = float(time_decay)
        self.l1_ratio = float(l1_ratio)
        self.learning_rate, self.beta = float(learning_rate), float(beta)
        self.alpha_grid = tuple(grid)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.history_size = int(history_size)
        self.history_top_k = int(history_top_k)
        self.history_every = int(history_every)
        self.tracked_features = self._check_indices(tracked_features, "tracked_features")
        self.featurizer = featurizer
        # the raw rows' schema (label, weight, group fields) when the model scores DataFrames
        self.spec = spec
        # optional, fitted by the pipeline's post-fit steps: a calibrator applied to the logits by
        # `predict` (fed the spec's group columns) and intervals for the true CTR
        self.calibrator: Any = None
        self.intervals: Any = None
        self.reset()

    # ---- hyperparameters ---------------------------------------------------------------------
    @property
    def alphas(self) -> np.ndarray:
        """The penalty of each candidate model: alpha_grid with alpha='auto', else [alpha]."""
        if self.regularization == "none":
            return np.zeros(1)
        return np.asarray(self.alpha_grid if self.alpha == "auto" else [self.alpha], dtype=np.float64)

    @property
    def _l1_share(self) -> float:
        return {"l1": 1.0, "l2": 0.0, "elastic": self.l1_ratio, "none": 0.0}[self.regularization]

    def _penalties(self) -> tuple[np.ndarray, np.ndarray]:
        """(lambda1, lambda2) per candidate: alpha * R's shares, times the row weight seen so far."""
        scale = self.alphas * self._rows
        return scale * self._l1_share, scale * (1.0 - self._l1_share)

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> DynamicLinear:
        """Forget everything learned (z, n, intercept, progressive losses, history); keep hyperparameters."""
        d, k = self.n_features, self.alphas.size
        self._z = np.zeros((d, k))
        self._n = np.zeros((d, k))
        self._bias_z = np.zeros(k)  # the intercept: an unpenalised extra coordinate
        self._bias_n = np.zeros(k)
        self._rows = 0.0  # decayed row weight S, the penalties' scale
        self._prog_loss = np.zeros(k)  # decayed progressive log loss (summed) per candidate
        self._prog_weight = 0.0
        self._slot = np.empty(d, dtype=np.int64)  # scratch for O(nnz) dedup of column indices
        self.n_updates = 0
        self.rows_seen = 0
        self._history: deque = deque(maxlen=self.history_size)
        return self

    def _weights(self, z: np.ndarray, n: np.ndarray, k: int | None = None) -> np.ndarray:
        """w from (z, n) under the current penalties: of shape [..., K], or of candidate k alone."""
        lam1, lam2 = self._penalties()
        if k is not None:
            lam1, lam2 = lam1[k], lam2[k]
        denom = (self.beta + np.sqrt(n)) / self.learning_rate + lam2
        return np.where(np.abs(z) > lam1, -(z - np.sign(z) * lam1) / denom, 0.0)

    def _bias_weight(self) -> np.ndarray:
        return -self._bias_z / ((self.beta + np.sqrt(self._bias_n)) / self.learning_rate)

    @property
    def _active(self) -> int:
        if self._prog_weight <= 0 or self._prog_loss.size == 1:
            return self._prog_loss.size - 1  # nothing scored yet: the strongest penalty
        loss = self._prog_loss / self._prog_weight
        return int(loss.size - 1 - np.argmin(loss[::-1]))  # ties: the larger alpha

    @property
    def alpha_(self) -> float:
        """The penalty in use: alpha, or the candidate alpha='auto' chose so far."""
        return float(self.alphas[self._active])

    def alpha_scores(self) -> dict[float, float]:
        """{candidate alpha: progressive (decayed) mean log loss}; NaN before any row is scored."""
        loss = self._prog_loss / self._prog_weight if self._prog_weight > 0 else np.full(self.alphas.size, np.nan)
        return dict(zip(self.alphas.tolist(), loss.tolist()))

    def _check_indices(self, indices: Any, name: str) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).ravel() if len(indices) else np.zeros(0, np.int64)
        bad = idx[(idx < 0) | (idx >= self.n_features)]
        if bad.size:
            raise ValueError(f"DynamicLinear.{name}: indices {bad[:5].tolist()} are outside "
                             f"[0, n_features={self.n_features})")
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
        if isinstance(X, (dict, list)) and self.spec is not None:
            X = self.spec.records_to_frame(X)
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
        """Reset, then `epochs` in-order passes over the rows (progressive losses from the first pass only)."""
        self.reset()
        X = self._as_csr(X, fit_featurizer=True)
        for epoch in range(self.epochs):
            self._train(X, y, sample_weight, score=epoch == 0)
        return self

    def fit_incremental(self, X: Any, y: Any, sample_weight: Any = None, score: bool = True) -> DynamicLinear:
        """Continue training on new rows, in order, `batch_size` rows per FTRL step.

        Works on a freshly loaded model too: load -> fit_incremental(new rows) -> save.
        A DataFrame is featurised by the attached featurizer (fitted on this data if unfitted).
        `score=False` trains without adding to the progressive losses (for another pass over rows
        the model has already seen, which would favour the weakest penalty of alpha='auto').
        """
        return self._train(self._as_csr(X), y, sample_weight, score=bool(score))

    def _train(self, X: sp.csr_matrix, y: Any, sample_weight: Any, score: bool) -> DynamicLinear:
        y, sw = self._check_target(y, X.shape[0], sample_weight)
        indptr, indices, data = X.indptr, X.indices, X.data
        for start in range(0, X.shape[0], self.batch_size):
            stop = min(start + self.batch_size, X.shape[0])
            a, b = indptr[start], indptr[stop]
            rw = np.ones(stop - start) if sw is None else sw[start:stop]
            self._step(indptr[start : stop + 1] - a, indices[a:b], data[a:b], y[start:stop], rw, score)
        return self

    def _unique_columns(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unique columns, position of each entry in them) in O(nnz), no sort: the last write per
        column marks its representative."""
        pos = np.arange(cols.size)
        self._slot[cols] = pos
        rep = self._slot[cols]
        is_rep = rep == pos
        return cols[is_rep], (np.cumsum(is_rep) - 1)[rep]

    def _step(self, indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, y: np.ndarray, rw: np.ndarray,
              score: bool) -> None:
        n_rows = len(indptr) - 1
        age = np.ones(n_rows)  # time_decay ** (rows that arrived after row j), per row even inside the batch
        if self.time_decay < 1.0:
            keep = self.time_decay**n_rows  # the old state ages by the whole batch
            for arr in (self._z, self._n, self._bias_z, self._bias_n, self._prog_loss):
                arr *= keep
            self._rows *= keep
            self._prog_weight *= keep
            age = self.time_decay ** np.arange(n_rows - 1, -1, -1, dtype=np.float64)
        uniq, inv = self._unique_columns(cols)
        z_u, n_u = self._z[uniq], self._n[uniq]  # [U, K]
        w_u = self._weights(z_u, n_u)
        w_b = self._bias_weight()
        batch = sp.csr_matrix((vals, inv, indptr), shape=(n_rows, uniq.size))
        margin = batch @ w_u + w_b  # [rows, K]: every candidate scores the batch before training on it
        if score:
            ll = y[:, None] * log_expit(margin) + (1.0 - y[:, None]) * log_expit(-margin)
            self._prog_loss -= (rw * age) @ ll
            self._prog_weight += float(rw @ age)
        resid = (expit(margin) - y[:, None]) * rw[:, None]  # the row's gradient per unit of x
        aged = resid * age[:, None]
        grad = batch.T @ aged
        grad2 = sp.csr_matrix((vals * vals, inv, indptr), shape=batch.shape).T @ (resid * aged)
        n_new = n_u + grad2
        sigma = (np.sqrt(n_new) - np.sqrt(n_u)) / self.learning_rate
        self._z[uniq] = z_u + grad - sigma * w_u
        self._n[uniq] = n_new
        nb_new = self._bias_n + (resid * aged).sum(axis=0)
        self._bias_z += aged.sum(axis=0) - (np.sqrt(nb_new) - np.sqrt(self._bias_n)) / self.learning_rate * w_b
        self._bias_n = nb_new
        self._rows += float(rw @ age)
        self.n_updates += 1
        self.rows_seen += n_rows
        if self.n_updates % self.history_every == 0:
            self._record_history()

    # ---- inference ---------------------------------------------------------------------------
    def _active_weights(self) -> np.ndarray:
        k = self._active
        return self._weights(self._z[:, k], self._n[:, k], k)

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits x . w + b of the model in use."""
        X = self._as_csr(X)
        return np.asarray(X @ self._active_weights(), dtype=np.float64) + self.intercept

    def predict_logits(self, X: Any) -> np.ndarray:
        """Same as `decision_function`: the name ensemble members are read through."""
        return self.decision_function(X)

    def group_columns(self, X: Any, calibrator: Any = None) -> dict[str, np.ndarray] | None:
        """A calibrator's group columns, read from raw rows (a CSR matrix has none)."""
        if self.spec is None or not isinstance(X, (pd.DataFrame, dict, list)):
            return None
        return super().group_columns(X, calibrator)

    def predict(self, X: Any) -> np.ndarray | float:
        """Click probabilities for CSR rows, or for raw rows (a DataFrame, dict or list of dicts)
        when a featurizer is attached; calibrated when a calibrator is set (a group-keyed calibrator
        needs raw rows)."""
        if self.calibrator is None and not isinstance(X, dict):
            return expit(self.decision_function(X))
        return super().predict(X)

    @property
    def intercept(self) -> float:
        return float(self._bias_weight()[self._active])

    def get_coefficients(self, as_dict: bool = False) -> np.ndarray | dict[int, float]:
        """Weights over the hashing space: a dense copy, or {index: weight} of the nonzeros."""
        w = self._active_weights()
        if as_dict:
            nz = np.flatnonzero(w)
            return dict(zip(nz.tolist(), w[nz].tolist()))
        return w

    # ---- surgery -----------------------------------------------------------------------------
    def sparsify(self, threshold: float | None = None, keep_mass: float = 0.99) -> int:
        """Zero near-zero weights; return how many nonzero weights of the model in use were removed.

        Default: keep the largest |w| that together carry `keep_mass` of the total |w| and zero the
        rest, so the largest weight always survives and a model that learned something keeps
        working. With `threshold`, zero every |w| < threshold instead (an absolute cut-off).
        Every candidate of alpha='auto' is sparsified by the same rule. Sets z_i = 0 (so w_i stays 0
        until new evidence outweighs the L1 penalty) and keeps n_i, the coordinate's step-size history.
        """
        if threshold is not None and not _finite_at_least(threshold, 0.0):
            raise ValueError(f"DynamicLinear.sparsify: threshold must be finite and >= 0, got {threshold!r}")
        if not (_finite_at_least(keep_mass, 0.0) and 0.0 < keep_mass <= 1.0):
            raise ValueError(f"DynamicLinear.sparsify: keep_mass is a share of the total |w| in (0, 1], got {keep_mass!r}")
        w_all = self._weights(self._z, self._n)
        removed = 0
        for k in range(w_all.shape[1]):
            a = np.abs(w_all[:, k])
            if threshold is not None:
                drop = (a > 0) & (a < threshold)
            else:
                drop = _outside_top_mass(a, keep_mass)
            self._z[drop, k] = 0.0
            if k == self._active:
                removed = int(drop.sum())
        return removed

    def reset_features(self, indices: Sequence[int] | np.ndarray) -> None:
        """Reset exactly these coordinates (z, n = 0, so w = 0), e.g. after a hashed field is repurposed."""
        idx = self._check_indices(indices, "indices")
        self._z[idx] = 0.0
        self._n[idx] = 0.0

    # ---- interpretability --------------------------------------------------------------------
    def _record_history(self) -> None:
        w = self._active_weights()
        k = min(self.history_top_k, self.n_features)
        top = np.argpartition(-np.abs(w), k - 1)[:k] if k else np.zeros(0, np.int64)
        idx = np.concatenate([top, self.tracked_features]).astype(np.int64)
        self._history.append((self.n_updates, self.rows_seen, idx, w[idx].copy()))

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
        config["alpha_grid"] = list(self.alpha_grid)
        return config

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        width = self.history_top_k + self.tracked_features.size
        h = list(self._history)
        arrays = {
            "z": self._z,
            "n": self._n,
            "w": self._active_weights(),  # integrity check: must follow from z, n and the config
            "bias_z": self._bias_z,
            "bias_n": self._bias_n,
            "prog_loss": self._prog_loss,
            "totals": np.array([self._rows, self._prog_weight]),
            "history_counts": np.array([[u, r] for u, r, _, _ in h], dtype=np.int64).reshape(-1, 2),
            "history_index": np.array([i for _, _, i, _ in h], dtype=np.int64).reshape(-1, width),
            "history_weight": np.array([v for _, _, _, v in h], dtype=np.float64).reshape(-1, width),
        }
        config = self._config()
        config.update(
            format=STATE_FORMAT,
            n_updates=self.n_updates,
            rows_seen=self.rows_seen,
            featurizer=None if self.featurizer is None else self.featurizer.to_dict(),
            spec=None if self.spec is None else self.spec.to_dict(),
            calibrator=None if self.calibrator is None else self.calibrator.to_dict(),
            intervals=None if self.intervals is None else self.intervals.to_dict(),
        )
        return arrays, config

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> DynamicLinear:
        if config.get("format") != STATE_FORMAT:
            raise BundleError(
                "metadata.json: this DynamicLinear was saved by an older within, where alpha was FTRL's learning "
                "rate and l1/l2 fixed totals; their meaning changed (alpha is now the penalty per row, the rate is "
                "learning_rate), so it cannot be loaded as the same model. Retrain it"
            )
        try:
            featurizer = None if config.get("featurizer") is None else HashingFeaturizer.from_dict(config["featurizer"])
            hyper = {k: config[k] for k in _HYPERPARAMETERS}
            spec = FeatureSpec.from_dict(config["spec"]) if config.get("spec") else None
            model = cls(**hyper, featurizer=featurizer, spec=spec)
            n_updates, rows_seen = int(config["n_updates"]), int(config["rows_seen"])
            model.calibrator, model.intervals = calibration_from_dict(config)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(f"metadata.json config is not a valid DynamicLinear config ({err!r})") from err
        d, k = model.n_features, model.alphas.size
        width = model.history_top_k + model.tracked_features.size
        expected = {"z": (d, k), "n": (d, k), "w": (d,), "bias_z": (k,), "bias_n": (k,), "prog_loss": (k,),
                    "totals": (2,)}
        for key, shape in expected.items():
            if key not in arrays or arrays[key].shape != shape:
                got = None if key not in arrays else arrays[key].shape
                raise BundleError(f"model.safetensors: array {key!r} has shape {got}, config says {shape}")
        hc, hi, hw = (arrays.get(k_) for k_ in ("history_counts", "history_index", "history_weight"))
        if hc is None or hi is None or hw is None or hi.shape != hw.shape or hi.shape[:1] != hc.shape[:1] or (
            hi.size and hi.shape[1] != width
        ):
            raise BundleError("model.safetensors: coefficient history arrays are missing or inconsistent")
        totals = arrays["totals"].astype(np.float64)
        if not (np.all(np.isfinite(arrays["z"])) and np.all(arrays["n"] >= 0) and np.all(totals >= 0)):
            raise BundleError("model.safetensors: z must be finite, and n and the row totals >= 0")
        model._z = arrays["z"].astype(np.float64)
        model._n = arrays["n"].astype(np.float64)
        model._bias_z = arrays["bias_z"].astype(np.float64)
        model._bias_n = arrays["bias_n"].astype(np.float64)
        model._prog_loss = arrays["prog_loss"].astype(np.float64)
        model._rows, model._prog_weight = float(totals[0]), float(totals[1])
        if not np.allclose(model._active_weights(), arrays["w"], rtol=1e-9, atol=1e-12):
            raise BundleError("model.safetensors: stored w does not follow from z, n and the config's FTRL settings")
        model.n_updates, model.rows_seen = n_updates, rows_seen
        for (u, r), i, v in zip(hc.tolist(), hi, hw):
            model._history.append((int(u), int(r), i.astype(np.int64), v.astype(np.float64)))
        return model


def _finite_at_least(v: Any, low: float) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v) \
        and v >= low


def _outside_top_mass(a: np.ndarray, keep_mass: float) -> np.ndarray:
    """Mask of the nonzero entries outside the smallest set of largest |w| holding keep_mass of sum |w|."""
    nz = np.flatnonzero(a)
    drop = np.zeros(a.shape, dtype=bool)
    if nz.size == 0:
        return drop
    order = nz[np.argsort(-a[nz], kind="stable")]
    mass = np.cumsum(a[order])
    n_keep = min(int(np.searchsorted(mass, keep_mass * mass[-1] * (1 - 1e-12))) + 1, nz.size)
    drop[order[n_keep:]] = True
    return drop
