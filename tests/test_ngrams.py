"""within.features.ngrams: hashed word 1-2-gram TF-IDF equals sklearn's TfidfVectorizer on the same
words, with idf from the train rows only, a fixed row width, and a JSON round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.feature_extraction.text import TfidfVectorizer

from within.features.ngrams import NgramTfidf, ngram_options

TRAIN = [
    "free shipping on all shoes", "shoes on sale today", "free gift with every order", "best shoes best price",
    "sale ends today", "free shipping today only", "new shoes new season", "order today and save",
]
TEST = ["free shoes today", "an unseen phrase entirely", "", "best price on shoes on sale"]


def _sorted_rows(matrix) -> list[np.ndarray]:
    m = matrix.tocsr()
    return [np.sort(m.data[m.indptr[i]:m.indptr[i + 1]]) for i in range(m.shape[0])]


@pytest.mark.parametrize("min_df", [1, 2])
def test_values_equal_sklearn_tfidf_with_train_idf(min_df):
    ours = NgramTfidf(n_buckets=2**22, min_df=min_df).fit([TRAIN])
    ref = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df, token_pattern=r"[a-z0-9']+").fit(TRAIN)
    for got, want in zip(_sorted_rows(ours.transform_sparse([TEST])), _sorted_rows(ref.transform(TEST))):
        np.testing.assert_allclose(got, want, rtol=1e-5)  # idf is stored to 6 decimals


def test_fixed_width_rows_keep_the_largest_values_and_pad_with_zero():
    model = NgramTfidf(n_buckets=2**20, min_df=1, max_ngrams=3).fit([TRAIN])
    ids, vals = model.transform([TEST])
    assert ids.shape == vals.shape == (4, 3) and ids.dtype == np.int64 and vals.dtype == np.float32
    full = _sorted_rows(model.transform_sparse([TEST]))
    np.testing.assert_allclose(np.sort(vals[0])[::-1], full[0][::-1][:3], rtol=1e-6)
    assert (ids[1] == 0).all() and (vals[1] == 0).all()  # nothing known: all padding
    assert (ids[2] == 0).all()  # empty text
    assert ((ids > 0) == (vals > 0)).all()


def test_fields_have_their_own_namespace_and_norm():
    model = NgramTfidf(n_buckets=2**20, min_df=1).fit([TRAIN, TRAIN])
    ids, vals = model.transform([["free shipping"], ["free shipping"]])
    used = ids[0][ids[0] > 0]
    assert len(set(used.tolist())) == len(used) == 6  # 3 n-grams per field, no id shared across fields
    assert float((vals[0] ** 2).sum()) == pytest.approx(2.0, rel=1e-5)  # one unit norm per field


def test_idf_comes_from_train_rows_only():
    a = NgramTfidf(n_buckets=2**20, min_df=1).fit([TRAIN])
    b = NgramTfidf(n_buckets=2**20, min_df=1).fit([TRAIN])
    b.transform([TEST * 50])  # transforming other rows changes nothing
    np.testing.assert_array_equal(a.transform([TEST])[1], b.transform([TEST])[1])


def test_json_round_trip_is_exact():
    model = NgramTfidf(n_buckets=2**18, min_df=2, max_ngrams=16).fit([TRAIN, TRAIN[::-1]])
    back = NgramTfidf.from_dict(json.loads(json.dumps(model.to_dict())))
    for x, y in zip(model.transform([TEST, TEST]), back.transform([TEST, TEST])):
        np.testing.assert_array_equal(x, y)


def test_transform_before_fit_and_wrong_field_count_are_refused():
    with pytest.raises(ValueError, match=r"call fit\(train texts\) before transform"):
        NgramTfidf().transform([TEST])
    with pytest.raises(ValueError, match="fitted on 1 text fields, got 2"):
        NgramTfidf(min_df=1).fit([TRAIN]).transform([TEST, TEST])


@pytest.mark.parametrize("cfg, message", [
    ({"ngram_range": [2, 1]}, r"ngram_range: need 1 <= min <= max, got \[2, 1\]"),
    ({"n_buckets": 1}, r"n_buckets: must be >= 2, got 1"),
    ({"min_df": 0}, r"min_df: must be >= 1, got 0"),
    ({"lr_scale": 0}, r"lr_scale: must be > 0, got 0"),
    ({"buckets": 5}, r"unknown options \['buckets'\]"),
])
def test_options_are_checked_by_name(cfg, message):
    with pytest.raises(ValueError, match=message):
        ngram_options(cfg)


def test_disabled_or_missing_options_mean_off():
    assert ngram_options(None) is None
    assert ngram_options({"enabled": False, "n_buckets": 8}) is None
    assert ngram_options({"enabled": True})["n_buckets"] == 2**20


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["ad", "sale", "shoe", "free", "x"]), max_size=8).map(" ".join),
                min_size=1, max_size=6))
def test_each_nonempty_field_row_has_unit_norm(texts):
    """Invariant: a row's values square-sum to the number of its fields with a known n-gram."""
    model = NgramTfidf(n_buckets=2**16, min_df=1).fit([TRAIN + texts, texts + TRAIN])
    ids, vals = model.transform([texts, texts[::-1]])
    known = [(model.transform([[t], [""]])[0] > 0).any() for t in texts]
    known_rev = [(model.transform([[""], [t]])[0] > 0).any() for t in texts[::-1]]
    np.testing.assert_allclose((vals.astype(np.float64) ** 2).sum(1), np.asarray(known, float) + np.asarray(known_rev, float), atol=1e-5)
