import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from within.models.base import BaseMLModel, BundleError
from within.models.linear import DynamicLinear, HashingFeaturizer, _outside_top_mass

D = 2**12


def _stream(n, seed=0, fields=8, card=20, flip_at=None, scale=1.0):
    """Hashed one-hot rows with a logistic truth; labels' relationship flips sign at flip_at."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, card, (n, fields))
    effect = np.random.default_rng(99).normal(0, scale, (fields, card))
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
    model = DynamicLinear(n_features=D, alpha=1e-5, batch_size=256).fit(X[:10000], y[:10000])
    assert roc_auc_score(y[10000:], model.predict(X[10000:])) > 0.8


def test_minibatch_of_one_matches_algorithm_1_with_per_row_penalty_by_hand():
    X = sp.csr_matrix(np.array([[1.0, 0, 2.0, 0], [0, 1.0, 1.0, 0], [1.0, 1.0, 0, 0]]))
    y = np.array([1.0, 0.0, 1.0])
    alpha, l1_ratio, lr, beta = 0.05, 0.3, 0.5, 1.0
    model = DynamicLinear(n_features=4, alpha=alpha, l1_ratio=l1_ratio, learning_rate=lr, beta=beta,
                          batch_size=1).fit(X, y)
    z, n, w = np.zeros(5), np.zeros(5), np.zeros(5)  # last slot: intercept (unpenalised)
    for t, (row, label) in enumerate(zip(np.hstack([X.toarray(), np.ones((3, 1))]), y)):
        for i in range(5):  # penalties: alpha * R's shares times the rows seen before this one
            l1, l2 = (0.0, 0.0) if i == 4 else (alpha * l1_ratio * t, alpha * (1 - l1_ratio) * t)
            w[i] = 0.0 if abs(z[i]) <= l1 else -(z[i] - np.sign(z[i]) * l1) / ((beta + np.sqrt(n[i])) / lr + l2)
        p = 1 / (1 + np.exp(-row @ w))
        for i in np.flatnonzero(row):
            g = (p - label) * row[i]
            sigma = (np.sqrt(n[i] + g * g) - np.sqrt(n[i])) / lr
            z[i] += g - sigma * w[i]
            n[i] += g * g
    np.testing.assert_allclose(model._z[:, 0], z[:4])
    np.testing.assert_allclose(model._n[:, 0], n[:4])
    np.testing.assert_allclose([model._bias_z[0], model._bias_n[0]], [z[4], n[4]])


def test_higher_alpha_means_fewer_and_smaller_weights():
    X, y = _stream(8000)
    nonzero, norm = [], []
    for alpha in (1e-5, 1e-4, 1e-3, 1e-2):
        w = DynamicLinear(n_features=D, alpha=alpha).fit(X, y).get_coefficients()
        nonzero.append(np.count_nonzero(w))
        norm.append(np.abs(w).sum())
    assert nonzero == sorted(nonzero, reverse=True) and nonzero[0] > nonzero[-1], nonzero
    assert norm == sorted(norm, reverse=True), norm
    # regularization chooses R: l1 zeroes weights, l2 only shrinks them
    l1 = DynamicLinear(n_features=D, regularization="l1", alpha=1e-3).fit(X, y).get_coefficients()
    l2 = DynamicLinear(n_features=D, regularization="l2", alpha=1e-3).fit(X, y).get_coefficients()
    assert np.count_nonzero(l1) < np.count_nonzero(l2)


def test_alpha_is_per_row_like_sklearn():
    """Same alpha, any batch size and stream length: alpha = 1/(C N) is LogisticRegression(C)'s l2 penalty."""
    X, y = _stream(6000, scale=0.5)
    n = X.shape[0]
    alpha = 1e-3
    lr = LogisticRegression(C=1 / (alpha * n), max_iter=1000).fit(X, y)
    ours = DynamicLinear(n_features=D, regularization="l2", alpha=alpha, epochs=20, batch_size=64).fit(X, y)
    w, ref = ours.get_coefficients(), lr.coef_[0]
    touched = np.flatnonzero(X.getnnz(axis=0))
    assert np.corrcoef(w[touched], ref[touched])[0, 1] > 0.98
    assert 0.85 < np.linalg.norm(w) / np.linalg.norm(ref) < 1.15
    # a 10x stronger penalty on the same rows is a 10x smaller C
    strong = LogisticRegression(C=0.1 / (alpha * n), max_iter=1000).fit(X, y).coef_[0]
    assert np.linalg.norm(strong) < 0.6 * np.linalg.norm(ref)
    # batch size does not change what alpha means
    small = DynamicLinear(n_features=D, regularization="l2", alpha=alpha, epochs=20, batch_size=512).fit(X, y)
    assert np.corrcoef(small.get_coefficients()[touched], w[touched])[0, 1] > 0.99


def test_sparsify_default_keeps_the_top_mass_and_a_working_model():
    X, y = _stream(12000)
    model = DynamicLinear(n_features=D, alpha=1e-5).fit(X[:10000], y[:10000])
    before_auc = roc_auc_score(y[10000:], model.predict(X[10000:]))
    w = model.get_coefficients()
    removed = model.sparsify()
    after = model.get_coefficients()
    assert 0 < removed < np.count_nonzero(w) and np.count_nonzero(after) == np.count_nonzero(w) - removed
    kept = after != 0
    assert np.abs(w[kept]).sum() >= 0.99 * np.abs(w).sum() - 1e-12
    assert np.abs(w[kept]).min() >= np.abs(w[(w != 0) & ~kept]).max()  # the smallest ones went
    np.testing.assert_array_equal(after[kept], w[kept])
    assert roc_auc_score(y[10000:], model.predict(X[10000:])) > before_auc - 0.005


def test_sparsify_default_never_empties_a_heavily_penalised_model():
    """A strong penalty leaves every weight below 1e-3 (an absolute cut-off there would remove them all),
    yet the model still ranks; the default keeps it working."""
    X, y = _stream(6000)
    model = DynamicLinear(n_features=D, regularization="l2", alpha=20.0).fit(X[:4000], y[:4000])
    w = model.get_coefficients()
    assert np.count_nonzero(w) > 0 and np.abs(w).max() < 1e-3
    before = roc_auc_score(y[4000:], model.predict(X[4000:]))
    assert before > 0.8
    model.sparsify()
    after = model.get_coefficients()
    assert np.count_nonzero(after) > 0.5 * np.count_nonzero(w)
    assert np.argmax(np.abs(after)) == np.argmax(np.abs(w))
    assert roc_auc_score(y[4000:], model.predict(X[4000:])) > before - 0.005


def test_sparsify_with_an_absolute_threshold():
    X, y = _stream(4000)
    model = DynamicLinear(n_features=D, regularization="l2", alpha=1e-5).fit(X, y)
    w = model.get_coefficients()
    threshold = np.quantile(np.abs(w[w != 0]), 0.5)
    expected = int(((w != 0) & (np.abs(w) < threshold)).sum())
    assert model.sparsify(threshold) == expected > 0
    after = model.get_coefficients()
    assert np.all((after == 0) | (np.abs(after) >= threshold))
    assert model.sparsify(threshold) == 0
    with pytest.raises(ValueError, match="keep_mass is a share of the total"):
        model.sparsify(keep_mass=1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40), st.floats(0.01, 1.0))
def test_top_mass_keeps_the_largest_and_enough_mass(values, keep_mass):
    a = np.asarray(values)
    drop = _outside_top_mass(a, keep_mass)
    kept = (a > 0) & ~drop
    assert not np.any(drop & (a == 0))
    if a.max() > 0:
        assert kept[np.argmax(a)]
        assert a[kept].sum() >= keep_mass * a.sum() * (1 - 1e-9)
        if drop.any():
            assert a[kept].min() >= a[drop].max()


def test_reset_features_resets_exactly_those():
    X, y = _stream(3000)
    model = DynamicLinear(n_features=D).fit(X, y)
    before = (model._z.copy(), model._n.copy(), model.get_coefficients())
    touched = np.flatnonzero(model._n[:, 0])[:5]
    model.reset_features(touched)
    others = np.setdiff1d(np.arange(D), touched)
    for now, old in zip((model._z, model._n, model.get_coefficients()), before):
        assert np.all(now[touched] == 0)
        np.testing.assert_array_equal(now[others], old[others])
    with pytest.raises(ValueError, match="DynamicLinear.indices"):
        model.reset_features([D])


def test_time_decay_is_a_per_row_factor_that_tracks_a_flipped_stream():
    X, y = _stream(16000, flip_at=8000)
    new_X, new_y = X[14000:], y[14000:]
    aucs = {}
    for decay in (1.0, 0.999):  # 0.999 per row: a half-life of ~690 rows
        model = DynamicLinear(n_features=D, alpha=1e-5, batch_size=100, time_decay=decay)
        model.fit_incremental(X[:10000], y[:10000])  # 2000 rows into the new regime
        aucs[decay] = roc_auc_score(new_y, model.predict(new_X))
    assert aucs[0.999] > aucs[1.0] + 0.02, aucs
    # per row, not per batch: the same decay forgets the same amount at any batch size
    a = DynamicLinear(n_features=D, time_decay=0.999, batch_size=1).fit_incremental(X[:500], y[:500])
    b = DynamicLinear(n_features=D, time_decay=0.999, batch_size=250).fit_incremental(X[:500], y[:500])
    assert a._rows == pytest.approx(b._rows, rel=1e-9) == pytest.approx((1 - 0.999**500) / (1 - 0.999), rel=1e-9)


def test_auto_alpha_chooses_by_progressive_log_loss():
    # pure noise: every weight is overfitting, so the strongest penalties win
    rng = np.random.default_rng(3)
    X, _ = _stream(6000, card=200)
    y_noise = (rng.random(6000) < 0.3).astype(float)
    noise = DynamicLinear(n_features=D, alpha="auto").fit_incremental(X, y_noise)
    assert noise.alpha_ >= 1e-4, noise.alpha_scores()
    # real signal over few rows-per-weight: a weak penalty wins
    X, y = _stream(20000)
    auto = DynamicLinear(n_features=D, alpha="auto").fit_incremental(X, y)
    scores = auto.alpha_scores()
    assert set(scores) == set(auto.alpha_grid) and auto.alpha_ == min(scores, key=scores.get)
    assert auto.alpha_ <= 1e-4
    # predictions are those of the chosen candidate, trained alone
    alone = DynamicLinear(n_features=D, alpha=auto.alpha_).fit_incremental(X, y)
    np.testing.assert_allclose(auto.predict(X[:500]), alone.predict(X[:500]), rtol=1e-10)
    with pytest.raises(ValueError, match="regularization='none' has no penalty"):
        DynamicLinear(regularization="none", alpha="auto")


def test_predict_logits_is_decision_function():
    X, y = _stream(2000)
    model = DynamicLinear(n_features=D).fit(X, y)
    np.testing.assert_array_equal(model.predict_logits(X), model.decision_function(X))


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


@pytest.mark.parametrize("alpha", [1e-4, "auto"])
def test_save_load_round_trip_and_continue(tmp_path, alpha):
    X, y = _stream(6000)
    model = DynamicLinear(n_features=D, alpha=alpha, time_decay=0.9999, history_every=5).fit(X[:4000], y[:4000])
    path = model.save(tmp_path / "m")
    loaded = BaseMLModel.load(path)
    assert isinstance(loaded, DynamicLinear) and loaded.alpha_ == model.alpha_
    np.testing.assert_array_equal(loaded.predict(X[4000:]), model.predict(X[4000:]))
    assert loaded.coefficient_history() == model.coefficient_history()
    assert loaded.alpha_scores() == model.alpha_scores()
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
        (lambda m: m["config"].pop("format"), "older within"),
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
    model = DynamicLinear(n_features=D, learning_rate=0.3, batch_size=128, epochs=3, featurizer=feat).fit(df, y)
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
    with pytest.raises(ValueError, match="DynamicLinear.regularization: 'lasso'"):
        DynamicLinear(regularization="lasso")
    with pytest.raises(ValueError, match=r"DynamicLinear.time_decay: a per-row decay factor in \(0, 1\]"):
        DynamicLinear(time_decay=0.0)
    with pytest.raises(ValueError, match=r"DynamicLinear.time_decay.*got 1.5"):
        DynamicLinear(time_decay=1.5)
    with pytest.raises(ValueError, match="DynamicLinear.alpha: the penalty per row must be finite and >= 0"):
        DynamicLinear(alpha=-1.0)
    with pytest.raises(ValueError, match="DynamicLinear.alpha: a penalty >= 0 or 'auto'"):
        DynamicLinear(alpha="adaptive")
    with pytest.raises(ValueError, match=r"DynamicLinear.l1_ratio: must be in \[0, 1\]"):
        DynamicLinear(l1_ratio=2)
    with pytest.raises(ValueError, match="DynamicLinear.learning_rate"):
        DynamicLinear(learning_rate=0)
    with pytest.raises(ValueError, match="lacks columns"):
        HashingFeaturizer(categorical=["a"], n_features=D).transform(pd.DataFrame({"b": [1]}))
