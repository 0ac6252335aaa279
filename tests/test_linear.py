import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from within.models.base import BaseMLModel, BundleError
from within.models.linear import DynamicLinear, HashingFeaturizer

D = 2**12


def _stream(n, seed=0, fields=8, card=20, flip_at=None):
    """Hashed one-hot rows with a logistic truth; labels' relationship flips sign at flip_at."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, card, (n, fields))
    effect = np.random.default_rng(99).normal(0, 1.0, (fields, card))
    logit = effect[np.arange(fields), codes].sum(1) - 1.0
    if flip_at is not None:
        logit[flip_at:] = -logit[flip_at:] - 2.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    cols = np.sort((np.arange(fields) * card + codes) * 31 % D, axis=1)
    X = sp.csr_matrix((np.ones(n * fields), cols.ravel(), np.arange(0, n * fields + 1, fields)), shape=(n, D))
    X.sum_duplicates()
    return X, y


def test_learns_a_logistic_truth():
    X, y = _stream(12000)
    model = DynamicLinear(n_features=D, alpha=0.3, batch_size=256).fit(X[:10000], y[:10000])
    assert roc_auc_score(y[10000:], model.predict(X[10000:])) > 0.8


def test_minibatch_of_one_matches_algorithm_1_by_hand():
    X = sp.csr_matrix(np.array([[1.0, 0, 2.0, 0], [0, 1.0, 1.0, 0]]))
    y = np.array([1.0, 0.0])
    alpha, beta, l1, l2 = 0.5, 1.0, 0.1, 0.2
    model = DynamicLinear(n_features=4, alpha=alpha, beta=beta, l1=l1, l2=l2, batch_size=1).fit(X, y)
    z, n, w = np.zeros(5), np.zeros(5), np.zeros(5)  # last slot: intercept (unpenalised)
    for row, label in zip(np.hstack([X.toarray(), np.ones((2, 1))]), y):
        for i in range(5):
            pen1, pen2 = (0.0, 0.0) if i == 4 else (l1, l2)
            w[i] = 0.0 if abs(z[i]) <= pen1 else -(z[i] - np.sign(z[i]) * pen1) / ((beta + np.sqrt(n[i])) / alpha + pen2)
        p = 1 / (1 + np.exp(-row @ w))
        for i in np.flatnonzero(row):
            g = (p - label) * row[i]
            sigma = (np.sqrt(n[i] + g * g) - np.sqrt(n[i])) / alpha
            z[i] += g - sigma * w[i]
            n[i] += g * g
    np.testing.assert_allclose(model._z, z[:4])
    np.testing.assert_allclose(model._n, n[:4])
    np.testing.assert_allclose(model._bias[:2], [z[4], n[4]])


def test_sparsify_zeroes_small_weights():
    X, y = _stream(4000)
    model = DynamicLinear(n_features=D, l1=0.0, regularization="l2").fit(X, y)
    w = model.get_coefficients()
    threshold = np.quantile(np.abs(w[w != 0]), 0.5)
    expected = int(((w != 0) & (np.abs(w) < threshold)).sum())
    assert model.sparsify(threshold) == expected > 0
    after = model.get_coefficients()
    assert np.all((after == 0) | (np.abs(after) >= threshold))
    np.testing.assert_array_equal(after[np.abs(w) >= threshold], w[np.abs(w) >= threshold])
    assert model.sparsify(threshold) == 0


def test_reset_features_resets_exactly_those():
    X, y = _stream(3000)
    model = DynamicLinear(n_features=D).fit(X, y)
    before = (model._z.copy(), model._n.copy(), model._w.copy())
    touched = np.flatnonzero(model._n)[:5]
    model.reset_features(touched)
    others = np.setdiff1d(np.arange(D), touched)
    for now, old in zip((model._z, model._n, model._w), before):
        assert np.all(now[touched] == 0)
        np.testing.assert_array_equal(now[others], old[others])
    with pytest.raises(ValueError, match="indices"):
        model.reset_features([D])


def test_time_decay_tracks_a_flipped_stream():
    X, y = _stream(16000, flip_at=8000)
    new_X, new_y = X[14000:], y[14000:]
    aucs = {}
    for decay in (0.0, 0.1):
        model = DynamicLinear(n_features=D, alpha=0.3, batch_size=100, time_decay=decay)
        model.fit_incremental(X[:10000], y[:10000])  # 2000 rows into the new regime
        aucs[decay] = roc_auc_score(new_y, model.predict(new_X))
    assert aucs[0.1] > aucs[0.0] + 0.02, aucs


def test_coefficient_history_is_bounded_and_tracks():
    X, y = _stream(6000)
    model = DynamicLinear(n_features=D, batch_size=100, history_every=2, history_size=5, history_top_k=3,
                          tracked_features=[7])
    model.fit_incremental(X, y)
    hist = model.coefficient_history()
    assert len(hist) == 5 and [h["update"] for h in hist] == [52, 54, 56, 58, 60]
    last = hist[-1]["weights"]
    assert 7 in last and len(last) <= 4
    top = np.argsort(-np.abs(model.get_coefficients()))[:3]
    assert set(top.tolist()) <= set(last)


def test_save_load_round_trip_and_continue(tmp_path):
    X, y = _stream(6000)
    model = DynamicLinear(n_features=D, time_decay=0.01, history_every=5).fit(X[:4000], y[:4000])
    path = model.save(tmp_path / "m")
    loaded = BaseMLModel.load(path)
    assert isinstance(loaded, DynamicLinear)
    np.testing.assert_array_equal(loaded.predict(X[4000:]), model.predict(X[4000:]))
    assert loaded.coefficient_history() == model.coefficient_history()
    # load -> fit_incremental -> save continues exactly as the in-memory model would
    model.fit_incremental(X[4000:5000], y[4000:5000])
    loaded.fit_incremental(X[4000:5000], y[4000:5000])
    loaded.save(tmp_path / "m2")
    again = BaseMLModel.load(tmp_path / "m2")
    np.testing.assert_array_equal(again.predict(X[5000:]), model.predict(X[5000:]))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["config"].update(alpha=m["config"]["alpha"] * 2), "does not follow"),
        (lambda m: m["config"].update(n_features=D * 2), "shape"),
        (lambda m: m["config"].update(regularization="l0"), "regularization"),
        (lambda m: m["config"].pop("beta"), "beta"),
        (lambda m: m.update({"class": "os.system"}), "unknown model class"),
    ],
)
def test_tampered_metadata_is_rejected(tmp_path, edit, match):
    X, y = _stream(2000)
    path = DynamicLinear(n_features=D).fit(X, y).save(tmp_path / "m")
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=match):
        BaseMLModel.load(path)


def test_featurizer_on_dataframes(tmp_path):
    rng = np.random.default_rng(1)
    n = 4000
    df = pd.DataFrame({
        "placement": rng.choice(["feed", "search", "story"], n),
        "device": rng.choice(["ios", "android", None], n),
        "bid": rng.lognormal(0, 1, n),
    })
    df.loc[::50, "bid"] = np.nan
    logit = (df["placement"] == "search") * 2.0 - 1.0 + 0.5 * np.log1p(df["bid"].fillna(1.0))
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    feat = HashingFeaturizer(categorical=["placement", "device"], numeric=["bid"], n_features=D)
    model = DynamicLinear(n_features=D, alpha=0.3, batch_size=128, epochs=3, featurizer=feat).fit(df, y)
    X = feat.transform(df)
    assert X.shape == (n, D) and X[1:2].nnz == 3 and X[50:51].nnz == 4  # missing bid adds an indicator
    assert roc_auc_score(y, model.predict(df)) > roc_auc_score(y, logit) - 0.01
    loaded = BaseMLModel.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.predict(df), model.predict(df))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(df))


def test_bad_input_errors_name_the_argument():
    model = DynamicLinear(n_features=D)
    with pytest.raises(ValueError, match="n_features=4096"):
        model.fit_incremental(sp.csr_matrix((2, 10)), [0, 1])
    with pytest.raises(ValueError, match="y has 3 labels for 2 rows"):
        model.fit_incremental(sp.csr_matrix((2, D)), [0, 1, 1])
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 1\]"):
        model.fit_incremental(sp.csr_matrix((2, D)), [0, 2])
    with pytest.raises(ValueError, match="no featurizer"):
        model.predict(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="regularization"):
        DynamicLinear(regularization="lasso")
    with pytest.raises(ValueError, match="lacks columns"):
        HashingFeaturizer(categorical=["a"], n_features=D).transform(pd.DataFrame({"b": [1]}))
