"""FeatureProcessor: raw DataFrame -> AdBatch arrays. Fitted on the train split only; saved as JSON.

- numeric: transform (log1p ...), NaN -> train median (+ a missing indicator when not required),
  standardised with train mean/std;
- categorical / group: train vocabulary (min_count, max_vocab); index 0 = padding, 1 = OOV;
- text: a stateless hashing tokenizer (murmurhash3, seed 0), tokenised once per unique string;
  or, with `text_model` (e.g. {"name": "minilm"}), frozen sentence embeddings `text_emb`
  [N, n_text, dim] from within.features.text_models (computed once per string, cached on disk);
- image: uint8 (C, S, S) arrays, deduplicated by object so rows of one ad share one copy.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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


def _as_str(col: pd.Series) -> np.ndarray:
    """Category values as strings; integral floats print as ints so 5, 5.0 and '5' agree."""
    if pd.api.types.is_float_dtype(col):
        vals = col.to_numpy()
        finite = np.isfinite(vals)
        if np.all(vals[finite] == np.round(vals[finite])):
            col = col.astype("Int64")
    out = col.astype(object).where(col.notna(), MISSING_TOKEN)
    return out.astype(str).to_numpy()


def _numeric_transform(x: np.ndarray, how: str) -> np.ndarray:
    if how == "log1p":
        return np.log1p(np.clip(x, 0.0, None))
    if how == "signed_log1p":
        return np.sign(x) * np.log1p(np.abs(x))
    return x


class FeatureProcessor:
    def __init__(self, spec: FeatureSpec, text_model: str | dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.text_model = _text_model_config(text_model)
        self.num_stats: dict[str, dict[str, float]] = {}
        self.vocabs: dict[str, list[str]] = {}
        self._index: dict[str, dict[str, int]] = {}

    @property
    def fitted(self) -> bool:
        return bool(self.num_stats) or bool(self.vocabs) or not (self.spec.numeric or self._vocab_fields)

    @property
    def _vocab_fields(self) -> list[FieldSpec]:
        return self.spec.of_type("categorical", "group")

    # ---- fit ----------------------------------------------------------------------------
    def fit(self, df: pd.DataFrame) -> FeatureProcessor:
        self.spec.validate_frame(df, require_label=False)
        for f in self.spec.numeric:
            x = _numeric_transform(df[f.name].to_numpy(dtype=np.float64), f.transform)
            finite = x[np.isfinite(x)]
            fill = float(np.median(finite)) if finite.size else 0.0
            x = np.where(np.isfinite(x), x, fill)
            std = float(x.std())
            self.num_stats[f.name] = {"fill": fill, "mean": float(x.mean()), "std": std if std > 1e-12 else 1.0}
        for f in self._vocab_fields:
            counts = pd.Series(_as_str(df[f.name])).value_counts(sort=True)
            counts = counts[counts >= f.min_count]
            if f.max_vocab is not None:
                counts = counts.iloc[: f.max_vocab]
            self.vocabs[f.name] = sorted(counts.index.tolist())
        self._build_index()
        return self

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
        return {
            "n_num": len(self.num_columns),
            "cat_cardinalities": [len(self.vocabs[f.name]) + 2 for f in self.spec.categorical],
            "cat_embedding_dims": [f.embedding_dim for f in self.spec.categorical],
            "text_fields": len(text),
            "text_buckets": max((f.n_buckets for f in text), default=0),
            **({"text_embedding_dim": self.text_embedder.dim} if self.text_model and text else {}),
            "image_fields": len(image),
            "image_channels": image[0].channels if image else 0,
            "image_size": image[0].size if image else 0,
            "image_augment": any(f.augment for f in image),
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
                x = _numeric_transform(raw, f.transform)
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
            out.update(self._embed_text(df, n, dedupe_images) if self.text_model else self._encode_text(df, n))
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
        if f.name not in df:
            return np.full(n, OOV, dtype=np.int64)
        index = self._index[f.name]
        codes, uniques = pd.factorize(pd.Series(_as_str(df[f.name])))
        lut = np.array([index.get(u, OOV) for u in uniques], dtype=np.int64)
        return lut[codes] if len(lut) else np.full(n, OOV, dtype=np.int64)

    def _encode_text(self, df: pd.DataFrame, n: int) -> dict[str, np.ndarray]:
        fields = self.spec.text
        max_len = max(f.max_tokens for f in fields)
        ids = np.zeros((n, len(fields), max_len), dtype=np.int64)
        present = np.zeros(n, dtype=bool)
        for k, f in enumerate(fields):
            if f.name not in df:
                continue
            col = df[f.name]
            ok = col.map(lambda v: isinstance(v, str) and v.strip() != "").to_numpy(dtype=bool)
            codes, uniques = pd.factorize(col.where(ok, None))
            table = np.stack([hash_tokens(u, f.max_tokens, f.n_buckets) for u in uniques]) if len(uniques) else None
            if table is not None:
                sel = codes >= 0
                ids[sel, k, : f.max_tokens] = table[codes[sel]]
            present |= ok
        return {"text": ids, "mask_text": present}

    @property
    def text_embedder(self) -> Any:
        from within.features.text_models import get_embedder

        cfg = dict(self.text_model or {})
        return get_embedder(cfg.pop("name"), **cfg)

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
                    pictures[key] = _to_uint8_image(v, f, df.index[i])
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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureProcessor:
        proc = cls(FeatureSpec.from_dict(d["spec"]), text_model=d.get("text_model"))
        proc.num_stats = {k: dict(v) for k, v in d["num_stats"].items()}
        proc.vocabs = {k: list(v) for k, v in d["vocabs"].items()}
        proc._build_index()
        return proc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> FeatureProcessor:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _text_model_config(text_model: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """None for the hashing tokenizer, else {"name": ..., embedder options}."""
    if text_model is None:
        return None
    if hasattr(text_model, "_metadata"):  # an omegaconf node
        from omegaconf import OmegaConf

        text_model = OmegaConf.to_container(text_model, resolve=True)
    cfg = {"name": text_model} if isinstance(text_model, str) else dict(text_model)
    if "name" not in cfg:
        raise FeatureError(f"text_model: needs a 'name' (hashing, minilm or a local model folder), got {cfg}")
    if cfg["name"] == "hashing":
        return None
    allowed = {"name", "cache_dir", "batch_size", "max_length", "device"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise FeatureError(f"text_model: unknown options {unknown}; allowed: {sorted(allowed)}")
    return cfg


def _to_uint8_image(v: Any, f: FieldSpec, row: Any) -> np.ndarray:
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
