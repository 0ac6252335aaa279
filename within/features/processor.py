"""FeatureProcessor: raw DataFrame -> AdBatch arrays. Fitted on the train split only; saved as JSON.

- numeric: transform (log1p ...), NaN -> train median (+ a missing indicator when not required),
  standardised with train mean/std;
- categorical / group: train vocabulary (min_count, max_vocab); index 0 = padding, 1 = OOV;
- text: a stateless hashing tokenizer (murmurhash3, seed 0), tokenised once per unique string;
  or, with `text_model` (e.g. {"name": "minilm"}), frozen sentence embeddings `text_emb`
  [N, n_text, dim] from within.features.text_models (computed once per string, cached on disk);
  or, with `text_model.finetune: true`, the model's WordPiece ids in `text` [N, n_text, max_length]
  (0 = padding) for the network's own, partly trainable, copy of the encoder;
  plus, with `text_model.ngrams.enabled`, hashed word 1-2-gram TF-IDF (within.features.ngrams,
  idf fitted on train) as `ngram_ids` int64 / `ngram_values` float32 [N, max_ngrams] for the wide part;
- image: uint8 (C, S, S) arrays, deduplicated by object so rows of one ad share one copy.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from within.features.ngrams import TFIDF_OPTIONS, NgramTfidf, ngram_options
from within.features.spec import FeatureError, FeatureSpec, FieldSpec

PAD, OOV = 0, 1
_TOKEN = re.compile(r"[a-z0-9']+")
MISSING_TOKEN = "<NA>"


def hash_tokens(text: str, max_tokens: int, n_buckets: int) -> np.ndarray:
    """Token ids in [1, n_buckets) for the first `max_tokens` words; 0-padded."""
    from sklearn.utils import murmurhash3_32

    out = np.zeros(max_tokens, dtype=np.int64)
    for j, tok in enumerate(_TOKEN.findall(text.lower())[:max_tokens]):
        out[j] = murmurhash3_32(tok, seed=0, positive=True) % (n_buckets - 1) + 1
    return out


def category_strings(col: pd.Series) -> np.ndarray:
    """Category values as the vocabulary's strings, each on its own: integral floats print as ints, so
    5, 5.0 and '5' agree whatever else the column holds (a row's key must not depend on the other rows)."""
    if pd.api.types.is_float_dtype(col):
        codes, uniques = pd.factorize(col, use_na_sentinel=True)
        keys = np.array([str(int(v)) if np.isfinite(v) and v == round(v) else str(v) for v in uniques] + [MISSING_TOKEN],
                        dtype=object)
        return keys[codes].astype(str)  # code -1 (missing) picks the last key
    out = col.astype(object).where(col.notna(), MISSING_TOKEN)
    return out.astype(str).to_numpy()


def numeric_transform(x: np.ndarray, how: str) -> np.ndarray:
    """A numeric field's `transform` (log1p | signed_log1p | none) applied to raw values."""
    if how == "log1p":
        return np.log1p(np.clip(x, 0.0, None))
    if how == "signed_log1p":
        return np.sign(x) * np.log1p(np.abs(x))
    return x


class FeatureProcessor:
    def __init__(self, spec: FeatureSpec, text_model: str | dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.text_model, ngrams = _text_model_config(text_model)
        self.ngram_config = ngrams if spec.text else None
        self.ngrams: NgramTfidf | None = None
        self.num_stats: dict[str, dict[str, float]] = {}
        self.vocabs: dict[str, list[str]] = {}
        self._index: dict[str, dict[str, int]] = {}

    @property
    def fitted(self) -> bool:
        if self.ngram_config is not None and self.ngrams is None:
            return False
        return bool(self.num_stats) or bool(self.vocabs) or not (self.spec.numeric or self._vocab_fields)

    @property
    def finetune(self) -> bool:
        """True when the network fine-tunes its own copy of the text encoder (WordPiece ids in `text`)."""
        return bool(self.text_model and self.text_model.get("finetune"))

    @property
    def _vocab_fields(self) -> list[FieldSpec]:
        return self.spec.of_type("categorical", "group")

    # ---- fit ----------------------------------------------------------------------------
    def fit(self, df: pd.DataFrame) -> FeatureProcessor:
        self.spec.validate_frame(df, require_label=False)
        for f in self.spec.numeric:
            x = numeric_transform(df[f.name].to_numpy(dtype=np.float64), f.transform)
            finite = x[np.isfinite(x)]
            fill = float(np.median(finite)) if finite.size else 0.0
            x = np.where(np.isfinite(x), x, fill)
            std = float(x.std())
            self.num_stats[f.name] = {"fill": fill, "mean": float(x.mean()), "std": std if std > 1e-12 else 1.0}
        for f in self._vocab_fields:
            counts = pd.Series(category_strings(df[f.name])).value_counts(sort=True)
            counts = counts[counts >= f.min_count]
            if f.max_vocab is not None:
                counts = counts.iloc[: f.max_vocab]
            self.vocabs[f.name] = sorted(counts.index.tolist())
        if self.ngram_config is not None:
            opts = {k: self.ngram_config[k] for k in TFIDF_OPTIONS}
            self.ngrams = NgramTfidf(**opts).fit(self._field_texts(df))
        self._build_index()
        return self

    def _field_texts(self, df: pd.DataFrame) -> list[list[str]]:
        """Each text field's strings, '' where missing (the n-gram path's input)."""
        return [
            [v if isinstance(v, str) else "" for v in df[f.name].to_numpy()] if f.name in df else [""] * len(df)
            for f in self.spec.text
        ]

    def _build_index(self) -> None:
        self._index = {name: {v: i + 2 for i, v in enumerate(vocab)} for name, vocab in self.vocabs.items()}

    # ---- shapes for the model -----------------------------------------------------------
    @property
    def num_columns(self) -> list[str]:
        cols = []
        for f in self.spec.numeric:
            cols.append(f.name)
            if not f.required:
                cols.append(f"{f.name}__missing")
        return cols

    @property
    def input_dim(self) -> dict[str, Any]:
        text, image = self.spec.text, self.spec.image
        if self.finetune and text:
            tm = self.text_model
            text_input = {"text_buckets": self.text_embedder.vocab_size, "text_transformer": tm["name"],
                          "text_train_layers": int(tm.get("finetune_layers", 2)),
                          "text_lr_scale": float(tm.get("finetune_lr_scale", 0.1))}
        elif self.text_model and text:
            text_input = {"text_buckets": max(f.n_buckets for f in text), "text_embedding_dim": self.text_embedder.dim}
        else:
            text_input = {"text_buckets": max((f.n_buckets for f in text), default=0)}
        return {
            "n_num": len(self.num_columns),
            "cat_cardinalities": [len(self.vocabs[f.name]) + 2 for f in self.spec.categorical],
            "cat_embedding_dims": [f.embedding_dim for f in self.spec.categorical],
            "text_fields": len(text),
            **text_input,
            **({"ngram_buckets": self.ngrams.n_buckets, "ngram_lr_scale": self.ngram_config["lr_scale"]}
               if self.ngrams is not None else {}),
            "image_fields": len(image),
            "image_channels": image[0].channels if image else 0,
            "image_size": image[0].size if image else 0,
            "image_augment": any(f.augment for f in image),
            # the AdBatch `groups` columns (every group field, embedded or not), for a hierarchy of random effects
            **({"group_fields": [f.name for f in self.spec.groups],
                "group_cardinalities": [len(self.vocabs[f.name]) + 2 for f in self.spec.groups]}
               if self.spec.groups else {}),
        }

    # ---- transform ----------------------------------------------------------------------
    def transform(self, X: Any, with_label: bool = False, dedupe_images: bool = False) -> dict[str, np.ndarray]:
        """AdBatch arrays for every row of X (a DataFrame, a record dict or a list of dicts).

        With `dedupe_images`, images come back as `image_table` [U, n_img, C, S, S] plus
        `image_index` [N] instead of a full `image` array (rows of one ad share a picture).
        """
        if not self._index and self.vocabs:
            self._build_index()
        if not self.fitted:
            raise FeatureError("FeatureProcessor: call fit(train_df) before transform")
        df = self.spec.records_to_frame(X)
        self.spec.validate_frame(df, require_label=with_label)
        n = len(df)
        out: dict[str, np.ndarray] = {}
        if self.spec.numeric:
            cols = []
            for f in self.spec.numeric:
                st = self.num_stats[f.name]
                raw = df[f.name].to_numpy(dtype=np.float64) if f.name in df else np.full(n, np.nan)
                x = numeric_transform(raw, f.transform)
                missing = ~np.isfinite(x)
                x = (np.where(missing, st["fill"], x) - st["mean"]) / st["std"]
                cols.append(x)
                if not f.required:
                    cols.append(missing.astype(np.float64))
            out["num"] = np.stack(cols, axis=1).astype(np.float32)
        if self.spec.categorical:
            out["cat"] = np.stack([self._encode(f, df, n) for f in self.spec.categorical], axis=1)
        if self.spec.groups:
            out["groups"] = np.stack([self._encode(f, df, n) for f in self.spec.groups], axis=1)
        out["mask_tabular"] = np.ones(n, dtype=bool)
        if self.spec.text:
            if self.finetune:
                out.update(self._tokenize_text(df, n))
            elif self.text_model:
                out.update(self._embed_text(df, n, dedupe_images))
            else:
                out.update(self._encode_text(df, n))
            if self.ngrams is not None:
                out["ngram_ids"], out["ngram_values"] = self.ngrams.transform(self._field_texts(df))
        if self.spec.image:
            out.update(self._encode_images(df, n, dedupe_images))
        if with_label:
            out["label"] = df[self.spec.label].to_numpy(dtype=np.float32)
            out["weight"] = (
                df[self.spec.weight].to_numpy(dtype=np.float32) if self.spec.weight else np.ones(n, np.float32)
            )
        if self.spec.truth and self.spec.truth in df:
            out["truth"] = df[self.spec.truth].to_numpy(dtype=np.float32)
        return out

    def _encode(self, f: FieldSpec, df: pd.DataFrame, n: int) -> np.ndarray:
        index = self._index[f.name]
        if f.name not in df:  # an optional field no record has: missing, as a None in the column would be
            return np.full(n, index.get(MISSING_TOKEN, OOV), dtype=np.int64)
        codes, uniques = pd.factorize(pd.Series(category_strings(df[f.name])))
        lut = np.array([index.get(u, OOV) for u in uniques], dtype=np.int64)
        return lut[codes] if len(lut) else np.full(n, OOV, dtype=np.int64)

    def _encode_text(self, df: pd.DataFrame, n: int) -> dict[str, np.ndarray]:
        return self._text_ids(df, n, max(f.max_tokens for f in self.spec.text),
                              lambda f, strings: np.stack([hash_tokens(u, f.max_tokens, f.n_buckets) for u in strings]))

    def _text_ids(self, df: pd.DataFrame, n: int, width: int,
                  tokenize: Callable[[FieldSpec, list[str]], np.ndarray]) -> dict[str, np.ndarray]:
        """Token ids [N, n_text, width] (0 = padding); `tokenize(field, distinct strings)` runs once per field."""
        ids = np.zeros((n, len(self.spec.text), width), dtype=np.int64)
        present = np.zeros(n, dtype=bool)
        for k, f in enumerate(self.spec.text):
            if f.name not in df:
                continue
            col = df[f.name]
            ok = col.map(lambda v: isinstance(v, str) and v.strip() != "").to_numpy(dtype=bool)
            codes, uniques = pd.factorize(col.where(ok, None))
            if len(uniques):
                table = tokenize(f, list(uniques))
                sel = codes >= 0
                ids[sel, k, : table.shape[1]] = table[codes[sel]]
            present |= ok
        return {"text": ids, "mask_text": present}

    @property
    def text_embedder(self) -> Any:
        from within.features.text_models import get_embedder

        cfg = {k: v for k, v in (self.text_model or {}).items() if k in EMBEDDER_OPTIONS}
        return get_embedder(cfg.pop("name"), **cfg)

    def _tokenize_text(self, df: pd.DataFrame, n: int) -> dict[str, np.ndarray]:
        """WordPiece ids per text field [N, n_text, max_length] (0 = padding), once per distinct string."""
        emb = self.text_embedder
        return self._text_ids(df, n, emb.max_length, lambda f, strings: emb.token_ids(strings))

    def _embed_text(self, df: pd.DataFrame, n: int, dedupe: bool) -> dict[str, np.ndarray]:
        """Sentence embeddings per text field; a missing field is the zero vector (and mask_text False)."""
        fields, emb = self.spec.text, self.text_embedder
        codes = np.full((n, len(fields)), -1, dtype=np.int64)
        strings: dict[str, int] = {}
        present = np.zeros(n, dtype=bool)
        for k, f in enumerate(fields):
            if f.name not in df:
                continue
            col = df[f.name]
            ok = col.map(lambda v: isinstance(v, str) and v.strip() != "").to_numpy(dtype=bool)
            c, uniques = pd.factorize(col.where(ok, None))
            lut = np.array([strings.setdefault(u, len(strings)) for u in uniques], dtype=np.int64)
            codes[c >= 0, k] = lut[c[c >= 0]]
            present |= ok
        vectors = np.concatenate([np.zeros((1, emb.dim), np.float32), emb.encode(list(strings))])
        # Rows share strings (one ad, many impressions): keep a table of distinct field tuples.
        uniq, inverse = np.unique(codes, axis=0, return_inverse=True)
        table = vectors[uniq + 1]  # code -1 (missing) -> the zero row
        inverse = inverse.reshape(-1).astype(np.int64)
        if dedupe:
            return {"text_emb_table": table, "text_emb_index": inverse, "mask_text": present}
        return {"text_emb": table[inverse], "mask_text": present}

    def _encode_images(self, df: pd.DataFrame, n: int, dedupe: bool) -> dict[str, np.ndarray]:
        fields = self.spec.image
        c, s = fields[0].channels, fields[0].size
        # Deduplicate by object identity: the simulator (and most ad logs) repeat one creative per ad.
        keys = np.zeros((n, len(fields)), dtype=np.int64)
        pictures: dict[int, np.ndarray] = {}
        present = np.zeros(n, dtype=bool)
        for k, f in enumerate(fields):
            if f.name not in df:
                continue
            for i, v in enumerate(df[f.name].to_numpy()):
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    continue
                key = id(v)
                if key not in pictures:
                    pictures[key] = to_uint8_image(v, f, df.index[i])
                keys[i, k] = key
                present[i] = True
        blank = np.zeros((c, s, s), dtype=np.uint8)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        table = np.stack([
            np.stack([pictures.get(int(key), blank) if key else blank for key in row]) for row in uniq
        ])
        inverse = inverse.reshape(-1)
        if dedupe:
            return {"image_table": table, "image_index": inverse.astype(np.int64), "mask_image": present}
        return {"image": table[inverse], "mask_image": present}

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"spec": self.spec.to_dict(), "num_stats": self.num_stats, "vocabs": self.vocabs}
        if self.text_model:  # hashing bundles keep their old shape
            d["text_model"] = dict(self.text_model)
        if self.ngrams is not None:
            d["ngrams"] = {**self.ngrams.to_dict(), "lr_scale": self.ngram_config["lr_scale"]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureProcessor:
        tm = d.get("text_model") or {"name": "hashing"}
        if d.get("ngrams"):
            saved = d["ngrams"]
            tm = {**tm, "ngrams": {**{k: saved[k] for k in TFIDF_OPTIONS}, "lr_scale": saved.get("lr_scale", 1.0)}}
        proc = cls(FeatureSpec.from_dict(d["spec"]), text_model=tm)
        if d.get("ngrams"):
            proc.ngrams = NgramTfidf.from_dict(d["ngrams"])
        proc.num_stats = {k: dict(v) for k, v in d["num_stats"].items()}
        proc.vocabs = {k: list(v) for k, v in d["vocabs"].items()}
        proc._build_index()
        return proc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> FeatureProcessor:
        return cls.from_dict(json.loads(Path(path).read_text()))


EMBEDDER_OPTIONS = ("name", "cache_dir", "batch_size", "max_length", "device")
FINETUNE_OPTIONS = ("finetune", "finetune_layers", "finetune_lr_scale")


def _text_model_config(text_model: str | dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(encoder config, n-gram options): encoder None for the hashing tokenizer, else {"name": ..., options};
    n-gram options None when `ngrams` is absent or not enabled."""
    if text_model is None:
        return None, None
    if hasattr(text_model, "_metadata"):  # an omegaconf node
        from omegaconf import OmegaConf

        text_model = OmegaConf.to_container(text_model, resolve=True)
    cfg = {"name": text_model} if isinstance(text_model, str) else dict(text_model)
    if "name" not in cfg:
        raise FeatureError(f"text_model: needs a 'name' (hashing, minilm or a local model folder), got {cfg}")
    try:
        ngrams = ngram_options(cfg.pop("ngrams", None))
    except ValueError as err:
        raise FeatureError(str(err)) from err
    if cfg["name"] == "hashing":
        unknown = sorted(set(cfg) - {"name"})
        if unknown:
            raise FeatureError(f"text_model=hashing: unknown options {unknown}; it takes only `ngrams` "
                               "(finetune and the encoder options belong to text_model=minilm)")
        return None, ngrams
    allowed = set(EMBEDDER_OPTIONS) | set(FINETUNE_OPTIONS)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise FeatureError(f"text_model: unknown options {unknown}; allowed: {sorted(allowed | {'ngrams'})}")
    if not cfg.get("finetune"):
        cfg = {k: v for k, v in cfg.items() if k in EMBEDDER_OPTIONS}  # frozen: bundles keep their old shape
    else:
        layers, scale = cfg.get("finetune_layers", 2), cfg.get("finetune_lr_scale", 0.1)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise FeatureError(f"text_model.finetune_layers: an int >= 1 (top transformer layers to train), got {layers!r}")
        if not 0.0 < float(scale) <= 1.0:
            raise FeatureError(f"text_model.finetune_lr_scale: must be in (0, 1] (the encoder's lr / the head's), "
                               f"got {scale!r}")
    return cfg, ngrams


def to_uint8_image(v: Any, f: FieldSpec, row: Any) -> np.ndarray:
    """Accept a tensor, an array (C,S,S) uint8 or float in [0,1], or an image file path."""
    if isinstance(v, (str, Path)):
        from PIL import Image

        try:
            img = Image.open(v).convert("RGB" if f.channels == 3 else "L").resize((f.size, f.size))
        except OSError as err:
            raise FeatureError(f"field '{f.name}': row {row}: cannot read image file {v!r} ({err})") from err
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr)
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    arr = np.asarray(v)
    if arr.shape != (f.channels, f.size, f.size):
        raise FeatureError(
            f"field '{f.name}': row {row}: image shape {arr.shape}, expected ({f.channels}, {f.size}, {f.size}) "
            f"(channels first); resize it or change size/channels in the features spec"
        )
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or arr.min() < 0 or arr.max() > 1:
            raise FeatureError(f"field '{f.name}': row {row}: image must be uint8, or float in [0, 1]")
        arr = np.round(arr * 255).astype(np.uint8)
    return arr
