"""RecordEncoder: raw records -> AdBatch arrays with no per-call DataFrame (the serving path).

`FeatureProcessor.transform` builds a pandas DataFrame and validates it column by column, which
costs milliseconds per call; an ad server scoring one auction at a time pays that on every call.
RecordEncoder reads the same fitted state (vocabularies, numeric statistics, text settings) and
goes from one record dict, a list of them, or a columnar batch (field -> sequence of values)
straight to the arrays `FeatureProcessor.transform` produces, checking each value as it reads it
and raising a FeatureError that names the field and the record.

Value rules (the processor's, read per value):
- numeric: int, float, bool or a numpy number; None/NaN is missing (allowed only when the field
  is not required); strings are refused.
- categorical / group: a str as it is; ints and integral floats print as ints (5, 5.0 and "5"
  agree); bool prints as "True"/"False"; None/NaN is the "<NA>" category (refused when required).
- text: a str (blank = absent); None/NaN is absent; refused when required.
- image: an array / tensor (C, S, S) uint8 or float in [0, 1], or an image file path; None is absent.

Where the DataFrame path depends on the other rows of the batch, this one does not (a row's
arrays are the same alone or in a batch): a float category column holding one non-integral value
prints its integral values as "5.0" there (here "5", the vocabulary's form), and an optional
field absent from every record is OOV there (here "<NA>", what training saw for a missing value).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from within.features.processor import (
    MISSING_TOKEN,
    OOV,
    FeatureProcessor,
    hash_tokens,
    to_uint8_image,
)
from within.features.spec import FeatureError, FieldSpec

_ABSENT = object()  # a key the record does not have (unlike an explicit None)
_NUMBER_TYPES = (int, float, np.integer, np.floating)
_PLAIN_NUMBERS = {int, float}


def _is_missing(v: Any) -> bool:
    return v is None or v is _ABSENT or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _where(i: int, n: int) -> str:
    return f"record {i}" if n > 1 else "the record"


def category_key(f: FieldSpec, v: Any, i: int, n: int) -> str:
    """The vocabulary key of one raw category value (the processor's category strings, per value)."""
    if isinstance(v, str):
        return str(v)
    if _is_missing(v):
        if f.required:
            raise FeatureError(
                f"field '{f.name}': missing value in {_where(i, n)}; it is required "
                "(set required: false in the features spec to allow it)"
            )
        return MISSING_TOKEN
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return str(int(v)) if math.isfinite(v) and v == round(v) else str(v)
    raise FeatureError(
        f"field '{f.name}': expected a category (str or int), got {type(v).__name__} {_short(v)} in {_where(i, n)}"
    )


def _with_int_keys(index: dict[str, int]) -> dict[Any, int]:
    lut: dict[Any, int] = dict(index)
    for key, code in index.items():
        try:
            as_int = int(key)
        except ValueError:
            continue
        if str(as_int) == key:
            lut[as_int] = code
    return lut


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class RecordEncoder:
    """The serving-side twin of a fitted FeatureProcessor: records -> AdBatch arrays.

    Args:
        processor: a fitted FeatureProcessor (from a bundle's spec.json).
        text_cache_size: distinct strings whose token ids are kept (ads repeat their headlines).

    `encode(X)` takes one record dict, a list of record dicts, or a DataFrame; `encode_columns`
    takes {field: sequence of values}. Both return exactly `processor.transform(X)` (keys num,
    cat, groups, mask_tabular, text or text_emb, mask_text, image, mask_image, as the spec has).
    Keys outside the spec are ignored, as `transform` ignores extra columns.
    """

    def __init__(self, processor: FeatureProcessor, text_cache_size: int = 65536) -> None:
        if not processor.fitted:
            raise FeatureError("RecordEncoder: the FeatureProcessor is not fitted; load it from a bundle or fit it")
        if processor.ngrams is not None or processor.finetune:
            # text as n-gram TF-IDF or WordPiece ids has no record-level encoder yet: the torch path serves it
            raise TypeError("RecordEncoder: text_model.ngrams / text_model.finetune inputs have no record encoder; "
                            "score these models through their FeatureProcessor (the torch path)")
        if not processor._index and processor.vocabs:
            processor._build_index()
        self.processor = processor
        spec = processor.spec
        self.spec = spec
        self.names = spec.names
        self._numeric = spec.numeric
        self._categorical = spec.categorical
        self._groups = spec.groups
        self._text = spec.text
        self._image = spec.image
        # vocabulary lookups that also take ints directly ("5" in the vocabulary answers 5): the
        # common int-valued fields (hour, ids) then skip the per-value conversion
        self._index = {f.name: _with_int_keys(processor._index[f.name]) for f in spec.of_type("categorical", "group")}
        stats = processor.num_stats
        self._fill = np.array([stats[f.name]["fill"] for f in self._numeric], dtype=np.float64)
        self._mean = np.array([stats[f.name]["mean"] for f in self._numeric], dtype=np.float64)
        self._std = np.array([stats[f.name]["std"] for f in self._numeric], dtype=np.float64)
        self._log1p = [j for j, f in enumerate(self._numeric) if f.transform == "log1p"]
        self._signed = [j for j, f in enumerate(self._numeric) if f.transform == "signed_log1p"]
        # output column of each numeric field, and of its missing indicator (-1: required, none)
        pos, ind, col = [], [], 0
        for f in self._numeric:
            pos.append(col)
            ind.append(-1 if f.required else col + 1)
            col += 1 if f.required else 2
        self._num_pos, self._num_ind = pos, ind
        self._n_num = len(processor.num_columns)
        self._tokens = functools.lru_cache(maxsize=int(text_cache_size))(hash_tokens)
        self._embedder = processor.text_embedder if (processor.text_model and self._text) else None

    def example_records(self, n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
        """`n` valid records built from the fitted state: categories cycle through each vocabulary
        (plus one unseen value), numerics sit near the training mean, text and images are drawn
        at random. For a load-time self-check, an API example, or tracing an export."""
        rng = np.random.default_rng(seed)
        words = ["offer", "shop", "new", "deal", "free", "today", "best", "save"]
        out = []
        for i in range(n):
            r: dict[str, Any] = {}
            for f in self.spec.fields:
                if f.type == "numeric":
                    r[f.name] = round(float(abs(rng.normal(1.0, 0.5)) * (10.0 if f.transform != "none" else 1.0)), 4)
                elif f.type in ("categorical", "group"):
                    vocab = [v for v in self.processor.vocabs.get(f.name, []) if v != MISSING_TOKEN]
                    r[f.name] = vocab[i % len(vocab)] if vocab and i % (len(vocab) + 1) < len(vocab) else "unseen"
                elif f.type == "text":
                    r[f.name] = " ".join(rng.choice(words, size=min(f.max_tokens, 5)))
                else:
                    r[f.name] = rng.integers(0, 256, (f.channels, f.size, f.size), dtype=np.uint8)
            out.append(r)
        return out

    # ---- input forms --------------------------------------------------------------------
    def columns_of(self, X: Any, extra: Sequence[str] = ()) -> tuple[dict[str, list], int]:
        """({field: values}, n) for the spec's fields (and `extra` names) of X: one record dict,
        a list of record dicts, or a DataFrame. A key a record lacks reads as absent."""
        names = self.names + [e for e in extra if e not in self.names]
        if isinstance(X, Mapping):
            return {name: [X.get(name, _ABSENT)] for name in names}, 1
        if hasattr(X, "columns") and hasattr(X, "iloc"):  # a DataFrame: its columns, as Python values
            n = len(X)
            if n == 0:
                raise FeatureError("input: empty DataFrame (0 rows); pass at least one record")
            return {name: (X[name].tolist() if name in X.columns else [_ABSENT] * n) for name in names}, n
        if isinstance(X, Sequence) and not isinstance(X, (str, bytes)):
            n = len(X)
            if n == 0:
                raise FeatureError("input: empty list of records; pass at least one record")
            for i, r in enumerate(X):
                if not isinstance(r, Mapping):
                    raise FeatureError(f"input: record {i} is a {type(r).__name__}, expected a dict")
            return {name: [r.get(name, _ABSENT) for r in X] for name in names}, n
        raise FeatureError(f"input: expected a record dict, a list of dicts or a DataFrame, got {type(X).__name__}")

    def check_columns(self, columns: Mapping[str, Sequence], extra: Sequence[str] = ()) -> tuple[dict[str, list], int]:
        """A columnar batch {field: sequence} as ({field: list}, n); every sequence has n values."""
        if not isinstance(columns, Mapping):
            raise FeatureError(f"input: a columnar batch is a dict {{field: values}}, got {type(columns).__name__}")
        lengths = {}
        for name, values in columns.items():
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
                raise FeatureError(f"field '{name}': a columnar batch needs a sequence of values, got {type(values).__name__}")
            lengths[name] = len(values)
        if not lengths or max(lengths.values()) == 0:
            raise FeatureError("input: empty columnar batch; pass at least one value per field")
        if len(set(lengths.values())) > 1:
            n = max(lengths.values())
            short = sorted(k for k, v in lengths.items() if v != n)
            raise FeatureError(f"field '{short[0]}': {lengths[short[0]]} values, but other fields have {n}; "
                               "every field of a columnar batch needs one value per record")
        n = next(iter(lengths.values()))
        names = self.names + [e for e in extra if e not in self.names]
        out = {}
        for name in names:
            values = columns.get(name)
            if isinstance(values, np.ndarray) and values.ndim > 1:
                out[name] = values  # a block of images [n, C, S, S]: read as one array, not n nested lists
            else:
                out[name] = [_ABSENT] * n if values is None else (
                    values.tolist() if hasattr(values, "tolist") else list(values))
        return out, n

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, X: Any) -> dict[str, np.ndarray]:
        """AdBatch arrays for one record dict, a list of record dicts, or a DataFrame."""
        columns, n = self.columns_of(X)
        return self.encode_checked(columns, n)

    def encode_columns(self, columns: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
        """AdBatch arrays for a columnar batch {field: sequence of values}."""
        cols, n = self.check_columns(columns)
        return self.encode_checked(cols, n)

    def encode_checked(self, columns: Mapping[str, list], n: int) -> dict[str, np.ndarray]:
        """Arrays from `columns_of` / `check_columns` output (one list of n values per field)."""
        for f in self.spec.fields:
            if f.required and all(v is _ABSENT for v in columns[f.name]):
                raise FeatureError(f"field '{f.name}': required but missing from the input "
                                   f"(present: {sorted(k for k, v in columns.items() if any(x is not _ABSENT for x in v))[:20]})")
        out: dict[str, np.ndarray] = {}
        if self._numeric:
            out["num"] = self._encode_numeric(columns, n)
        known: dict[str, list[int]] = {}
        if self._categorical:
            out["cat"] = self._encode_codes(self._categorical, columns, n, known)
        if self._groups:
            out["groups"] = self._encode_codes(self._groups, columns, n, known)
        out["mask_tabular"] = np.ones(n, dtype=bool)
        if self._text:
            out.update(self._encode_embedded(columns, n) if self._embedder is not None else self._encode_text(columns, n))
        if self._image:
            out.update(self._encode_images(columns, n))
        return out

    def raw_columns(self, columns: Mapping[str, list], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Raw values of `names` (e.g. a calibrator's group keys) as arrays; names no record has are left out."""
        out = {}
        for name in names:
            values = columns.get(name)
            if values is None or all(v is _ABSENT for v in values):
                continue
            values = [None if v is _ABSENT else v for v in values]
            if all(v is None or isinstance(v, _NUMBER_TYPES) for v in values) and any(v is None for v in values):
                values = [np.nan if v is None else v for v in values]  # pandas' float column with NaN
            out[name] = np.asarray(values)
        return out

    def _encode_numeric(self, columns: Mapping[str, list], n: int) -> np.ndarray:
        raw = np.empty((n, len(self._numeric)), dtype=np.float64)
        for j, f in enumerate(self._numeric):
            values = columns[f.name]
            ok = set(map(type, values)) <= _PLAIN_NUMBERS
            raw[:, j] = values if ok else [self._number(f, v, i, n) for i, v in enumerate(values)]
            if ok and f.required and not np.isfinite(raw[:, j]).all():
                i = int(np.flatnonzero(~np.isfinite(raw[:, j]))[0])
                self._number(f, values[i], i, n)
        x = raw
        if self._log1p:
            x[:, self._log1p] = np.log1p(np.clip(x[:, self._log1p], 0.0, None))
        if self._signed:
            s = x[:, self._signed]
            x[:, self._signed] = np.sign(s) * np.log1p(np.abs(s))
        missing = ~np.isfinite(x)
        x = (np.where(missing, self._fill, x) - self._mean) / self._std
        out = np.empty((n, self._n_num), dtype=np.float64)
        out[:, self._num_pos] = x
        ind = [j for j, c in enumerate(self._num_ind) if c >= 0]
        if ind:
            out[:, [self._num_ind[j] for j in ind]] = missing[:, ind]
        return out.astype(np.float32)

    @staticmethod
    def _number(f: FieldSpec, v: Any, i: int, n: int) -> float:
        if _is_missing(v):
            if f.required:
                raise FeatureError(f"field '{f.name}': missing in {_where(i, n)}; it is required "
                                   "(set required: false in the features spec to impute it)")
            return math.nan
        if isinstance(v, (*_NUMBER_TYPES, bool, np.bool_)):
            x = float(v)
            if f.required and not math.isfinite(x):
                raise FeatureError(f"field '{f.name}': {x} in {_where(i, n)} is not a finite number; it is required "
                                   "(set required: false in the features spec to impute it)")
            return x
        raise FeatureError(f"field '{f.name}': expected a number, got {type(v).__name__} {_short(v)} in {_where(i, n)}")

    def _encode_codes(self, fields: list[FieldSpec], columns: Mapping[str, list], n: int,
                      known: dict[str, list[int]]) -> np.ndarray:
        """Vocabulary codes [n, len(fields)]; `known` holds codes already computed in this call
        (a group field embedded as a categorical is in both `cat` and `groups`)."""
        codes = np.empty((n, len(fields)), dtype=np.int64)
        for j, f in enumerate(fields):
            index = self._index[f.name]
            get = index.get
            values = columns[f.name]
            # type() is exact: a bool (an int subclass, hashing like 1) must not find the key "1"
            col = known.get(f.name)
            if col is None:
                col = [get(v, OOV) if (t := type(v)) is str else (get(v, -1) if t is int else -1) for v in values]
                if -1 in col:  # an unseen int, a float, None, ...: convert those values the slow way
                    for i, c in enumerate(col):
                        if c < 0:
                            col[i] = get(category_key(f, values[i], i, n), OOV)
                known[f.name] = col
            codes[:, j] = col
        return codes

    def _text_values(self, f: FieldSpec, values: list, n: int) -> list[str | None]:
        out: list[str | None] = []
        for i, v in enumerate(values):
            if isinstance(v, str):
                out.append(v if v.strip() else None)
            elif _is_missing(v):
                if f.required:
                    raise FeatureError(f"field '{f.name}': missing value in {_where(i, n)}; it is required "
                                       "(set required: false in the features spec to allow it)")
                out.append(None)
            else:
                raise FeatureError(f"field '{f.name}': expected text (str), got {type(v).__name__} {_short(v)} "
                                   f"in {_where(i, n)}")
        return out

    def _encode_text(self, columns: Mapping[str, list], n: int) -> dict[str, np.ndarray]:
        """Token ids [n, fields, max_tokens]; each distinct string is tokenized once per call (the rows
        of one ad repeat its headline) and its ids are gathered into every row that holds it."""
        fields = self._text
        width = max(f.max_tokens for f in fields)
        ids = np.zeros((n, len(fields), width), dtype=np.int64)
        present = np.zeros(n, dtype=bool)
        for k, f in enumerate(fields):
            lut: dict[str | None, int] = {None: 0}
            codes = np.fromiter((lut.setdefault(t, len(lut)) for t in self._text_values(f, columns[f.name], n)),
                                dtype=np.int64, count=n)
            table = np.zeros((len(lut), width), dtype=np.int64)
            for text, j in lut.items():
                if text is not None:
                    table[j, : f.max_tokens] = self._tokens(text, f.max_tokens, f.n_buckets)
            ids[:, k] = table[codes]
            present |= codes != 0
        return {"text": ids, "mask_text": present}

    def _encode_embedded(self, columns: Mapping[str, list], n: int) -> dict[str, np.ndarray]:
        fields, emb = self._text, self._embedder
        texts = [self._text_values(f, columns[f.name], n) for f in fields]
        strings = sorted({t for col in texts for t in col if t is not None})
        vectors = dict(zip(strings, emb.encode(strings))) if strings else {}
        out = np.zeros((n, len(fields), emb.dim), dtype=np.float32)
        present = np.zeros(n, dtype=bool)
        for k, col in enumerate(texts):
            for i, t in enumerate(col):
                if t is not None:
                    out[i, k] = vectors[t]
                    present[i] = True
        return {"text_emb": out, "mask_text": present}

    def _encode_images(self, columns: Mapping[str, list], n: int) -> dict[str, np.ndarray]:
        fields = self._image
        c, s = fields[0].channels, fields[0].size
        block = columns[fields[0].name]
        if len(fields) == 1 and isinstance(block, np.ndarray) and block.ndim == 4 and block.dtype == np.uint8 \
                and block.shape[1:] == (c, s, s) and block.flags.c_contiguous:
            return {"image": block[:, None], "mask_image": np.ones(n, dtype=bool)}  # a view: no copy of the pixels
        out = np.zeros((n, len(fields), c, s, s), dtype=np.uint8)
        present = np.zeros(n, dtype=bool)
        seen: dict[int, np.ndarray] = {}  # one creative object shared by many rows is checked once
        for k, f in enumerate(fields):
            values = columns[f.name]
            if isinstance(values, np.ndarray) and values.ndim == 4:  # a block of images, one per row
                if values.shape[1:] != (f.channels, f.size, f.size) or values.dtype != np.uint8:
                    raise FeatureError(f"field '{f.name}': an image block of shape {values.shape[1:]} and dtype "
                                       f"{values.dtype}; expected uint8 ({f.channels}, {f.size}, {f.size}) per row")
                out[:, k] = values
                present[:] = True
                continue
            for i, v in enumerate(values):
                if _is_missing(v):
                    continue
                image = seen.get(id(v))
                if image is None:
                    image = seen[id(v)] = to_uint8_image(v, f, i)
                out[i, k] = image
                present[i] = True
        return {"image": out, "mask_image": present}


__all__ = ["RecordEncoder", "category_key"]
