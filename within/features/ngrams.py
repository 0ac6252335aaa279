"""Hashed word n-grams with sublinear TF-IDF weights, fitted on the train split: the text's wide path.

Each text field's words (the processor's tokenizer: lower-cased `[a-z0-9']+`) give unigrams and
bigrams, hashed with sklearn's HashingVectorizer (murmurhash3, one namespace per field, so a word
in the headline and the same word in the description are different features) into
`n_buckets - 1` ids (0 is padding). A row's value for an n-gram is

    (1 + log tf) * idf,   idf = ln((1 + N) / (1 + df)) + 1      (sklearn's smooth idf)

L2-normalised per field, which is TfidfVectorizer(sublinear_tf=True) per field, hstacked. N and df
come from the train rows only; an n-gram with df < min_df there is dropped, as a vocabulary would.
The network's wide part learns one scalar per id and adds sum(value * weight) to the logit, so
that part alone is a logistic regression on the TF-IDF of the same words. Each n-gram occurs in a
handful of rows, and an Adam step moves its scalar by about the learning rate each time, so at
the tower's rate (3e-3) the scalars stay near zero for many epochs; the wide part therefore
trains at `lr_scale` times the rate (AdPredictorNN, as w = lr_scale * theta).

Rows come out as a fixed width of `max_ngrams` (id, value) pairs, 0-padded (the largest values
kept when a row has more), so batches and the exported ONNX graph have one shape.
State (idf of the kept ids) is plain JSON lists.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

_TOKEN = re.compile(r"[a-z0-9']+")
DEFAULTS: dict[str, Any] = {"n_buckets": 2**20, "ngram_range": (1, 2), "min_df": 2, "max_ngrams": 256,
                            "lr_scale": 10.0}
TFIDF_OPTIONS = ("n_buckets", "ngram_range", "min_df", "max_ngrams")


def ngram_options(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `text_model.ngrams` node -> validated options, or None when the path is off."""
    if not cfg or not cfg.get("enabled", True):
        return None
    opts = {**DEFAULTS, **{k: v for k, v in dict(cfg).items() if k != "enabled"}}
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"text_model.ngrams: unknown options {unknown}; allowed: enabled, {', '.join(DEFAULTS)}")
    lo, hi = (int(x) for x in opts["ngram_range"])
    if not 1 <= lo <= hi:
        raise ValueError(f"text_model.ngrams.ngram_range: need 1 <= min <= max, got {list(opts['ngram_range'])}")
    for key, least in (("n_buckets", 2), ("min_df", 1), ("max_ngrams", 1)):
        if int(opts[key]) < least:
            raise ValueError(f"text_model.ngrams.{key}: must be >= {least}, got {opts[key]}")
    if not float(opts["lr_scale"]) > 0:
        raise ValueError(f"text_model.ngrams.lr_scale: must be > 0, got {opts['lr_scale']}")
    return {"n_buckets": int(opts["n_buckets"]), "ngram_range": [lo, hi], "min_df": int(opts["min_df"]),
            "max_ngrams": int(opts["max_ngrams"]), "lr_scale": float(opts["lr_scale"])}


class NgramTfidf:
    """Fit on train texts, then `transform` -> (ids int64 [N, max_ngrams], values float32 [N, max_ngrams]).

    Args:
        n_buckets: hash space including the padding id 0 (the wide table's size).
        ngram_range: (min_n, max_n) word n-grams.
        min_df: an n-gram must occur in at least this many train rows to be kept.
        max_ngrams: (id, value) pairs per row, over all text fields.
    """

    def __init__(self, n_buckets: int = DEFAULTS["n_buckets"], ngram_range: Sequence[int] = DEFAULTS["ngram_range"],
                 min_df: int = DEFAULTS["min_df"], max_ngrams: int = DEFAULTS["max_ngrams"]) -> None:
        opts = ngram_options({"n_buckets": n_buckets, "ngram_range": ngram_range, "min_df": min_df,
                              "max_ngrams": max_ngrams})
        assert opts is not None
        self.n_buckets, self.min_df, self.max_ngrams = opts["n_buckets"], opts["min_df"], opts["max_ngrams"]
        self.ngram_range = tuple(opts["ngram_range"])
        self.idf: dict[int, np.ndarray] = {}  # field index -> dense idf over ids (0 = dropped)
        self.n_train = 0

    def _analyzer(self, field: int):
        lo, hi = self.ngram_range

        def grams(text: str) -> list[str]:
            words = _TOKEN.findall(text.lower())
            return [f"{field}\x1f" + " ".join(words[i : i + n]) for n in range(lo, hi + 1)
                    for i in range(len(words) - n + 1)]

        return grams

    def _counts(self, field: int, texts: Sequence[str]) -> sp.csr_matrix:
        """Raw n-gram counts [N, n_buckets] with ids in [1, n_buckets)."""
        from sklearn.feature_extraction.text import HashingVectorizer

        hv = HashingVectorizer(analyzer=self._analyzer(field), n_features=self.n_buckets - 1, alternate_sign=False,
                               norm=None, dtype=np.float64)
        x = hv.transform(texts).tocsr()
        x.indices += 1  # shift past the padding id
        x = sp.csr_matrix((x.data, x.indices, x.indptr), shape=(x.shape[0], self.n_buckets))
        x.sum_duplicates()
        return x

    def fit(self, fields: Sequence[Sequence[str]]) -> NgramTfidf:
        """`fields`: one list of train texts per text field (all of equal length; '' = missing)."""
        self.n_train = len(fields[0]) if fields else 0
        for k, texts in enumerate(fields):
            x = self._counts(k, texts)
            df = np.bincount(x.indices, minlength=self.n_buckets)
            idf = np.log((1.0 + self.n_train) / (1.0 + df)) + 1.0
            idf[df < self.min_df] = 0.0
            idf[0] = 0.0
            self.idf[k] = np.round(idf, 6)  # the precision spec.json keeps
        return self

    def transform_sparse(self, fields: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """TF-IDF [N, n_buckets] (sum of the per-field L2-normalised blocks)."""
        from sklearn.preprocessing import normalize

        if not self.idf:
            raise ValueError("NgramTfidf: call fit(train texts) before transform")
        if len(fields) != len(self.idf):
            raise ValueError(f"NgramTfidf: fitted on {len(self.idf)} text fields, got {len(fields)}")
        total = None
        for k, texts in enumerate(fields):
            x = self._counts(k, texts)
            x.data = 1.0 + np.log(x.data)
            x = x.multiply(self.idf[k][None, :]).tocsr()
            x.eliminate_zeros()
            x = normalize(x, norm="l2", axis=1)
            total = x if total is None else total + x
        return total.tocsr()

    def transform(self, fields: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        x = self.transform_sparse(fields)
        n, k = x.shape[0], self.max_ngrams
        ids = np.zeros((n, k), dtype=np.int64)
        vals = np.zeros((n, k), dtype=np.float32)
        lengths = np.diff(x.indptr)
        for i in np.flatnonzero(lengths):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            row_ids, row_vals = x.indices[lo:hi], x.data[lo:hi]
            if hi - lo > k:  # keep the largest weights
                top = np.argsort(-row_vals, kind="stable")[:k]
                row_ids, row_vals = row_ids[top], row_vals[top]
            ids[i, : len(row_ids)] = row_ids
            vals[i, : len(row_ids)] = row_vals
        return ids, vals

    # ---- persistence (plain JSON) -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        kept = {str(k): {"ids": np.flatnonzero(v).tolist(), "idf": v[v > 0].tolist()}
                for k, v in self.idf.items()}
        return {"n_buckets": self.n_buckets, "ngram_range": list(self.ngram_range), "min_df": self.min_df,
                "max_ngrams": self.max_ngrams, "n_train": self.n_train, "idf": kept}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NgramTfidf:
        out = cls(d["n_buckets"], d["ngram_range"], d["min_df"], d["max_ngrams"])
        out.n_train = int(d.get("n_train", 0))
        for k, entry in d["idf"].items():
            idf = np.zeros(out.n_buckets, dtype=np.float64)
            idf[np.asarray(entry["ids"], dtype=np.int64)] = np.asarray(entry["idf"], dtype=np.float64)
            out.idf[int(k)] = idf
        return out


__all__ = ["DEFAULTS", "TFIDF_OPTIONS", "NgramTfidf", "ngram_options"]
