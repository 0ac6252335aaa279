"""AdPredictorNN: the multimodal CTR network (plain PyTorch; `within.lit` wraps it for training).

    tabular (cat + num) ─ TabularEncoder ─┬─ vector ─┐
                                          └─ raw embeddings + numerics ───────────┐
    text  ─ text encoder ────── vector ─┤ missing rows -> learned vector          ├─ concat ─ tower ─ head ─ + wide ─ logit
    image ─ image encoder ───── vector ─┘ (AdaptiveDropout per modality)          │
                   all vectors ─ CrossModalAttention ─────────────────────────────┘
                                                    fused ─ cross layers ─ cross head ─ + ─┘ (cross_layers > 0)

The tower is [Linear -> BatchNorm1d (LayerNorm when dp_compatible) -> ReLU -> Dropout] per
hidden width, with an optional QuantumNoiseLayer after the first block. The wide part is a
first-order term, one learned scalar per category value, summed into the logit as in Wide & Deep
(Cheng et al., 2016): additive per-ID effects, which dominate CTR, need no tower capacity.
With n-gram inputs (`ngram_ids`, `ngram_values`: hashed word 1-2-gram TF-IDF from the
FeatureProcessor) the wide part also holds one scalar per n-gram id and adds
sum(value * scalar): on its own, a logistic regression on the TF-IDF of the ad's words.
The text encoder is HashedTextEncoder (token ids), EmbeddingTextEncoder (frozen sentence
embeddings) or TransformerTextEncoder (WordPiece ids through a partly fine-tuned transformer).
The optional cross network (DCN-v2, Wang et al., WWW 2021) runs beside the tower on the same fused
vector, layer-normalised: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, so one layer holds every pairwise product of fused
features (age embedding x text vector, placement x image vector) that a ReLU tower learns only
slowly; a Linear head adds it to the logit.
With `hierarchy` (e.g. [account_id, campaign_id], group fields of the spec, parent first), a
HierarchicalEffects layer (within/nn/hierarchy.py) adds nested random-effect offsets to the logit,
read from the AdBatch `groups` codes and shrunk toward their parent by a Gaussian prior whose sd is
fixed or set by empirical Bayes; `regularization()` is that prior's penalty for the training loss.
"""
from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from within.nn.attention import CrossModalAttention
from within.nn.dropout import FastDropout
from within.nn.lookup import IndexAddEmbedding
from within.nn.encoders import (
    EmbeddingTextEncoder,
    HashedTextEncoder,
    TabularEncoder,
    TransformerTextEncoder,
    build_image_encoder,
)
from within.nn.hierarchy import HierarchicalEffects
from within.nn.smoothquant import smooth_linears

MODALITIES = ("tabular", "text", "image")
_INPUT_KEYS = (
    "n_num", "cat_cardinalities", "cat_embedding_dims", "text_fields", "text_buckets",
    "image_fields", "image_channels", "image_size", "text_embedding_dim", "image_augment",
    "ngram_buckets", "ngram_lr_scale", "text_transformer", "text_train_layers", "text_lr_scale",
    "group_fields", "group_cardinalities",
)


def _import_layer(module: str, name: str, option: str) -> Any:
    """Import an optional layer lazily; fail loudly rather than train without it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"{option} needs {module}.{name}, which is not built yet or failed to import ({e}); "
            f"turn {option} off or install that module"
        ) from e


def _augment_images(image: torch.Tensor) -> torch.Tensor:
    """Per row, flip the images [B, n, C, H, W] left-right and up-down (each with probability 1/2) and
    shift them circularly by a random offset: pixel statistics (colour balance, brightness,
    contrast) stay exactly as they were, only position and orientation change."""
    b, h, w = image.shape[0], image.shape[-2], image.shape[-1]
    lead = (b,) + (1,) * (image.dim() - 1)
    for dim in (-1, -2):
        flip = torch.rand(b, device=image.device) < 0.5
        image = torch.where(flip.view(lead), image.flip(dim), image)
    for dim, size in ((-2, h), (-1, w)):
        shift = torch.randint(0, size, (b,), device=image.device)
        idx = (torch.arange(size, device=image.device)[None, :] - shift[:, None]) % size  # [B, size]
        view = [b] + [1] * (image.dim() - 1)
        view[dim] = size
        image = image.gather(dim, idx.view(view).expand_as(image))
    return image


def _projection_input(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input `encoder.proj` receives when `encoder(x)` runs. Read through a hook, so the
    encoder's own code (EmbeddingBag mean, its DP variant, a dtype cast) stays the only copy."""
    seen: list[torch.Tensor] = []
    handle = encoder.proj.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        encoder(x)
    finally:
        handle.remove()
    return seen[0]


def _check_codes(key: str, codes: torch.Tensor, limits: torch.Tensor, names: Sequence[str]) -> None:
    """Every code of column j in [0, limits[j]); CPU only (on GPU the check would sync every step)."""
    if codes.device.type != "cpu" or not codes.numel():
        return
    bad = (codes < 0) | (codes >= limits.to(codes.dtype))
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"batch[{key!r}][{row}, {col}] = {int(codes[row, col])} is outside [0, {int(limits[col])}) for "
            f"{names[col]}; encode with the FeatureProcessor fitted for this model"
        )


def _normalise_input_dim(input_dim: Mapping[str, Any] | int) -> dict[str, Any]:
    if isinstance(input_dim, int) and not isinstance(input_dim, bool):  # the spec's int: numeric inputs only
        input_dim = {"n_num": input_dim}
    if not isinstance(input_dim, Mapping):
        raise TypeError(
            f"input_dim must be a dict like FeatureProcessor.input_dim, got {type(input_dim).__name__}"
        )
    unknown = sorted(set(input_dim) - set(_INPUT_KEYS))
    if unknown:
        raise ValueError(f"input_dim has unknown keys {unknown}; known keys are {list(_INPUT_KEYS)}")
    d: dict[str, Any] = {}
    for key in ("n_num", "text_fields", "text_buckets", "image_fields", "image_channels", "image_size",
                "text_embedding_dim", "ngram_buckets"):
        v = input_dim.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"input_dim[{key!r}] must be an int >= 0, got {v!r}")
        d[key] = int(v)
    d["image_augment"] = bool(input_dim.get("image_augment", False))
    name = input_dim.get("text_transformer") or ""
    if not isinstance(name, str):
        raise ValueError(f"input_dim['text_transformer'] must be a model name (e.g. 'minilm') or empty, got {name!r}")
    d["text_transformer"] = name
    d["text_train_layers"] = int(input_dim.get("text_train_layers", 2))
    d["text_lr_scale"] = float(input_dim.get("text_lr_scale", 0.1))
    d["ngram_lr_scale"] = float(input_dim.get("ngram_lr_scale", 1.0))
    if not d["ngram_lr_scale"] > 0:
        raise ValueError(f"input_dim['ngram_lr_scale'] must be > 0, got {d['ngram_lr_scale']}")
    if d["ngram_buckets"] == 1:
        raise ValueError("input_dim['ngram_buckets'] must be 0 (no n-gram wide path) or >= 2 (0 is padding), got 1")
    cards = input_dim.get("cat_cardinalities", [])
    if isinstance(cards, (str, bytes)) or not isinstance(cards, Sequence):
        raise TypeError(f"input_dim['cat_cardinalities'] must be a list of ints, got {cards!r}")
    d["cat_cardinalities"] = [int(c) for c in cards]
    dims = input_dim.get("cat_embedding_dims")
    if dims is not None and len(dims) != len(cards):
        raise ValueError(
            f"input_dim['cat_embedding_dims'] has {len(dims)} entries for {len(cards)} categorical "
            "fields; give one per field (null = automatic)"
        )
    d["cat_embedding_dims"] = None if dims is None else [None if x is None else int(x) for x in dims]
    d["group_fields"] = [str(x) for x in input_dim.get("group_fields", [])]
    d["group_cardinalities"] = [int(x) for x in input_dim.get("group_cardinalities", [])]
    if len(d["group_fields"]) != len(d["group_cardinalities"]):
        raise ValueError(
            f"input_dim['group_fields'] has {len(d['group_fields'])} names for {len(d['group_cardinalities'])} "
            "group_cardinalities; give one cardinality per group field (FeatureProcessor.input_dim does)"
        )
    if d["text_fields"] and not d["text_embedding_dim"] and d["text_buckets"] < 2:
        raise ValueError(f"input_dim['text_buckets'] must be >= 2 with text fields, got {d['text_buckets']}")
    if d["image_fields"] and (d["image_channels"] < 1 or d["image_size"] < 1):
        raise ValueError(
            "input_dim['image_channels'] and input_dim['image_size'] must be >= 1 with image fields, got "
            f"{d['image_channels']} and {d['image_size']}"
        )
    return d


class AdPredictorNN(nn.Module):
    """Multimodal CTR network: AdBatch (dict[str, Tensor]) -> float32 logits [B].

    Args:
        input_dim: FeatureProcessor.input_dim, e.g. {"n_num": 7, "cat_cardinalities": [7, 5],
            "text_fields": 2, "text_buckets": 32768, "image_fields": 1, "image_channels": 3,
            "image_size": 16}. Modalities with no fields are left out of the model. With
            "text_embedding_dim" > 0 the text input is `text_emb` float [B, text_fields, dim]
            (frozen sentence embeddings) and the text encoder is a Linear projection. With
            "text_transformer" (e.g. "minilm") the text input is WordPiece ids in `text` and the
            encoder is TransformerTextEncoder, training its top "text_train_layers" layers at
            "text_lr_scale" times the learning rate. With "ngram_buckets" > 0 the batch also holds
            `ngram_ids` / `ngram_values` [B, K] and the wide part gets one scalar per n-gram id,
            trained at "ngram_lr_scale" times the learning rate (stored as theta, used as
            ngram_lr_scale * theta: Adam's step is scale-free, so the product moves that much faster).
        hidden_dims: tower widths.
        dropout_rate: dropout after each tower block.
        enable_quantum_noise: put a QuantumNoiseLayer (kwargs from `noise`) after the first block.
        use_cross_modal: add CrossModalAttention over the modality vectors to the tower input
            (when the model has two or more modalities; a tabular-only model has none).
        attention_heads, attention_dim: CrossModalAttention size.
        text_dim, image_dim: width of the text and image vectors.
        image_encoder: "simple_cnn" or a timm model name.
        noise: kwargs for QuantumNoiseLayer (channels is set here).
        adaptive_dropout: kwargs for AdaptiveDropout applied to each modality vector; None = off.
        dp_compatible: LayerNorm instead of BatchNorm, DPMultiheadAttention, per-sample-safe
            encoders, so Opacus can compute per-sample gradients.
        tabular_dim: width of the tabular vector.
        embedding_dim: one width for every categorical embedding (None = per-field rule).
        use_wide: add the first-order (wide) term over categorical values.
        image_pretrained, image_weights_path: passed to a timm image encoder.
        cross_layers: DCN-v2 cross layers beside the tower (0 = none); see the module docstring.
        text_token_dropout: word dropout in the hashed text encoder while training (see
            HashedTextEncoder): stops the tower from recognising single ads by their word set.
        image_augment: while training, flip and circularly shift each image at random (pixel
            statistics unchanged), for the same reason; valid only where a creative's effect does
            not depend on where its elements sit. None: as input_dim["image_augment"] says (set by
            image fields with `augment: true` in the feature spec).
        hierarchy: group fields (input_dim["group_fields"], parent first, e.g. ["account_id",
            "campaign_id"]) that get nested random-effect offsets on the logit; None = off.
        hierarchy_tau: the offsets' prior sd, one per level or one for all; None = empirical Bayes
            (the HierarchyPrior callback updates it between epochs).
        hierarchy_lr_scale: the offsets learn this many times faster than the rest (see HierarchicalEffects).
        sparse_embeddings: the categorical and wide tables get sparse gradients (only the rows a
            batch touches); AdScoreModule then steps them with LazyAdam beside the configured
            optimizer (docs/throughput.md). Not with dp_compatible (Opacus needs dense gradients).
        lean_single_modality: with one modality, leave out what only mixes modalities: the
            cross-modal attention, and (tabular alone, no cross layers, no adaptive dropout) the
            tabular vector, a linear copy of the raw embeddings the tower's first layer already
            reads. The function class is the same and a CTR step 25-35% cheaper. False rebuilds
            networks saved before this option (bundles without it load that way: LEGACY_KWARGS).
    """

    # kwargs added after networks were first saved, with the value that rebuilds an older network
    LEGACY_KWARGS = {"lean_single_modality": False}

    def __init__(
        self,
        input_dim: Mapping[str, Any],
        hidden_dims: Sequence[int] = (256, 128),
        dropout_rate: float = 0.1,
        enable_quantum_noise: bool = False,
        use_cross_modal: bool = True,
        attention_heads: int = 4,
        attention_dim: int = 64,
        text_dim: int = 32,
        image_dim: int = 32,
        image_encoder: str = "simple_cnn",
        noise: Mapping[str, Any] | None = None,
        adaptive_dropout: Mapping[str, Any] | None = None,
        dp_compatible: bool = False,
        tabular_dim: int = 64,
        embedding_dim: int | None = None,
        use_wide: bool = True,
        image_pretrained: bool = False,
        image_weights_path: str | None = None,
        text_token_dropout: float = 0.0,
        image_augment: bool | None = None,
        cross_layers: int = 0,
        hierarchy: Sequence[str] | None = None,
        hierarchy_tau: float | Sequence[float] | None = None,
        hierarchy_lr_scale: float = 10.0,
        sparse_embeddings: bool = False,
        lean_single_modality: bool = True,
    ) -> None:
        # how to rebuild this network from a bundle (NetworkModel saves it beside the weights)
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        self.input_dim = _normalise_input_dim(input_dim)
        d = self.input_dim
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        hidden_dims = [int(h) for h in hidden_dims]
        if any(h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive ints, got {hidden_dims}")
        self.dp_compatible = bool(dp_compatible)
        self.image_augment = d["image_augment"] if image_augment is None else bool(image_augment)
        self.use_cross_modal = bool(use_cross_modal)
        self.hidden_dims = hidden_dims
        self.sparse_embeddings = bool(sparse_embeddings)
        if self.sparse_embeddings and self.dp_compatible:
            raise ValueError("sparse_embeddings=true needs dense gradients under DP-SGD; set "
                             "model.net.sparse_embeddings=false with privacy=dp")
        cards = d["cat_cardinalities"]
        self.n_cat = len(cards)
        has_tabular = bool(cards or d["n_num"])
        self.lean = bool(lean_single_modality) and has_tabular + bool(d["text_fields"]) + bool(d["image_fields"]) == 1
        tabular_vector = not (self.lean and has_tabular and not int(cross_layers) and adaptive_dropout is None)

        self.modalities: list[str] = []
        vec_dims: dict[str, int] = {}
        fused_dim = 0
        if has_tabular:
            self.tabular = TabularEncoder(cards, d["n_num"], tabular_dim if tabular_vector else 0, embedding_dim,
                                          d["cat_embedding_dims"], sparse=self.sparse_embeddings,
                                          fast_backward=not self.dp_compatible)
            self.modalities.append("tabular")
            if tabular_vector:
                vec_dims["tabular"] = tabular_dim
            fused_dim += self.tabular.raw_dim
        # text_embedding_dim > 0: the processor sends sentence embeddings (`text_emb`), not token ids
        self.text_key = "text_emb" if d["text_embedding_dim"] and not d["text_transformer"] else "text"
        if d["text_fields"] and d["text_transformer"]:
            if dp_compatible:
                raise ValueError(
                    "text_model.finetune=true trains a Hugging Face encoder, which DP-SGD's per-sample gradients do "
                    "not cover; use text_model.finetune=false (frozen embeddings) or privacy=none"
                )
            self.text = TransformerTextEncoder(d["text_transformer"], d["text_fields"], text_dim,
                                               train_layers=d["text_train_layers"], lr_scale=d["text_lr_scale"])
        elif d["text_fields"] and d["text_embedding_dim"]:
            self.text = EmbeddingTextEncoder(d["text_fields"], d["text_embedding_dim"], text_dim)
        elif d["text_fields"]:
            self.text = HashedTextEncoder(
                d["text_fields"], d["text_buckets"], text_dim, dp_compatible=dp_compatible,
                token_dropout=text_token_dropout,
            )
        if d["text_fields"]:
            self.modalities.append("text")
            vec_dims["text"] = text_dim
        if d["image_fields"]:
            self.image = build_image_encoder(
                image_encoder, d["image_fields"], d["image_channels"], image_dim, dp_compatible=dp_compatible,
                pretrained=image_pretrained, weights_path=image_weights_path,
            )
            self.modalities.append("image")
            vec_dims["image"] = image_dim
        self.image_dim = int(image_dim) if d["image_fields"] else 0
        if not self.modalities:
            raise ValueError(
                "input_dim describes no features (no cat_cardinalities, n_num, text_fields or image_fields); "
                "the feature spec needs at least one field"
            )
        fused_dim += sum(vec_dims.values())
        # A learned stand-in per modality for rows where it is missing (nn.Embedding: Opacus-safe).
        self.missing = nn.ModuleDict({m: nn.Embedding(1, w) for m, w in vec_dims.items()})
        for emb in self.missing.values():
            nn.init.normal_(emb.weight, std=0.02)

        self.modality_dropout = None
        if adaptive_dropout is not None:
            cls = _import_layer("within.nn.dropout", "AdaptiveDropout", "adaptive_dropout")
            self.modality_dropout = cls(**dict(adaptive_dropout))
            absent = [m for m in self.modalities if m not in self.modality_dropout.groups]
            if absent:
                raise ValueError(
                    f"adaptive_dropout.groups={list(self.modality_dropout.groups)} lacks {absent}; "
                    f"include every modality of this model: {self.modalities}"
                )

        self.attention = None
        # one modality has nothing to attend across (lean_single_modality)
        if self.use_cross_modal and not self.lean:
            self.attention = CrossModalAttention(
                vec_dims, attention_heads, attention_dim, dropout=dropout_rate, dp_compatible=dp_compatible
            )
            fused_dim += attention_dim
        self.fused_dim = fused_dim

        layers: list[nn.Module] = []
        width = fused_dim
        for i, h in enumerate(hidden_dims):
            # BatchNorm mixes samples in a batch, which breaks DP-SGD's per-sample clipping.
            layers += [nn.Linear(width, h), nn.LayerNorm(h) if self.dp_compatible else nn.BatchNorm1d(h), nn.ReLU()]
            if dropout_rate > 0:
                layers.append(FastDropout(dropout_rate))
            if i == 0 and enable_quantum_noise:
                cls = _import_layer("within.nn.noise", "QuantumNoiseLayer", "enable_quantum_noise")
                layers.append(cls(h, **dict(noise or {})))
            width = h
        self.tower = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        if int(cross_layers) < 0:
            raise ValueError(f"cross_layers must be >= 0, got {cross_layers!r}")
        self.cross = nn.ModuleList(nn.Linear(fused_dim, fused_dim) for _ in range(int(cross_layers)))
        self.cross_head = nn.Linear(fused_dim, 1) if cross_layers else None
        # The fused parts have unrelated scales, and products of them grow fast: normalise first.
        self.cross_norm = nn.LayerNorm(fused_dim) if cross_layers else None
        if self.cross_head is not None:  # start as the plain model; the cross term grows in as it helps
            nn.init.zeros_(self.cross_head.weight)
            nn.init.zeros_(self.cross_head.bias)

        self.wide = None
        if use_wide and cards:
            self.wide = (nn.Embedding if self.dp_compatible else IndexAddEmbedding)(
                sum(cards), 1, sparse=self.sparse_embeddings)
            nn.init.zeros_(self.wide.weight)
            offsets = torch.tensor([0] + cards[:-1], dtype=torch.long).cumsum(0)
            self.register_buffer("wide_offsets", offsets, persistent=False)
        # the n-gram wide part: an Embedding (not an EmbeddingBag) so ghost clipping's norm sampler covers it
        self.text_wide = None
        if use_wide and d["text_fields"] and d["ngram_buckets"]:
            self.text_wide = nn.Embedding(d["ngram_buckets"], 1, padding_idx=0)
            nn.init.zeros_(self.text_wide.weight)
            self.text_wide_scale = d["ngram_lr_scale"]
        self.register_buffer("_cat_limits", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.hierarchy = self._build_hierarchy(hierarchy, hierarchy_tau, hierarchy_lr_scale)

    def _build_hierarchy(self, fields: Sequence[str] | None, tau: Any, lr_scale: float) -> HierarchicalEffects | None:
        if not fields:
            return None
        if isinstance(fields, str):
            fields = [fields]
        if self.dp_compatible:
            raise ValueError(
                "model.net.hierarchy does not run under DP-SGD: its empirical-Bayes prior reads per-group row "
                "counts outside the private gradient, and its penalty is not a per-sample loss; set "
                "model.net.hierarchy=null or privacy=none"
            )
        known = self.input_dim["group_fields"]
        missing = [f for f in fields if f not in known]
        if missing:
            raise ValueError(
                f"model.net.hierarchy: {missing} are not group fields of the feature spec (group fields: {known}); "
                "declare them with type: group in conf/features/<name>.yaml, or drop them from the hierarchy"
            )
        cols = [known.index(f) for f in fields]
        return HierarchicalEffects(fields, cols, [self.input_dim["group_cardinalities"][c] for c in cols], tau=tau,
                                   lr_scale=lr_scale)

    def regularization(self) -> torch.Tensor | None:
        """The hierarchy prior's penalty, per training impression (None without a hierarchy): add it to a
        loss that is a mean per impression."""
        return None if self.hierarchy is None else self.hierarchy.penalty()

    # ---- input checks -----------------------------------------------------------------------
    def _check_batch(self, X: Mapping[str, torch.Tensor]) -> int:
        """Validate the AdBatch keys the model reads; return the batch size."""
        if not isinstance(X, Mapping):
            raise TypeError(f"AdPredictorNN expects an AdBatch dict[str, Tensor], got {type(X).__name__}")
        d = self.input_dim
        sizes: dict[str, int] = {}

        def need(key: str, what: str) -> torch.Tensor:
            if key not in X:
                raise KeyError(f"batch[{key!r}] is missing; the model was built for {what}. Pass batch[{key!r}].")
            return X[key]

        def check(key: str, t: Any, dtypes: tuple[torch.dtype, ...], shape: tuple[int | None, ...], what: str) -> None:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"batch[{key!r}] must be a torch.Tensor ({what}), got {type(t).__name__}")
            if t.dtype not in dtypes:
                names = " or ".join(str(x).replace("torch.", "") for x in dtypes)
                raise TypeError(f"batch[{key!r}] must have dtype {names} ({what}), got {str(t.dtype).replace('torch.', '')}")
            if t.dim() != len(shape) or any(s is not None and s != t.shape[i] for i, s in enumerate(shape)):
                want = "[" + ", ".join("B" if i == 0 else ("*" if s is None else str(s)) for i, s in enumerate(shape)) + "]"
                raise ValueError(f"batch[{key!r}] must have shape {want} ({what}), got {list(t.shape)}")
            sizes[key] = t.shape[0]

        ints = (torch.int64, torch.int32)
        if self.n_cat:
            cat = need("cat", f"{self.n_cat} categorical fields")
            check("cat", cat, ints, (None, self.n_cat), "category indices, 0 = pad, 1 = OOV")
            _check_codes("cat", cat, self._cat_limits, [f"categorical field {i}" for i in range(self.n_cat)])
        if d["n_num"]:
            num = need("num", f"{d['n_num']} numeric columns")
            check("num", num, (torch.float32,), (None, d["n_num"]), "scaled numerics")
        if "text" in self.modalities and self.text_key == "text_emb" and "text_emb" in X:
            check("text_emb", X["text_emb"], (torch.float32, torch.float16, torch.bfloat16),
                  (None, d["text_fields"], d["text_embedding_dim"]), "sentence embeddings per text field")
        elif "text" in self.modalities and "text" in X:
            check("text", X["text"], ints, (None, d["text_fields"], None), "hashed token ids, 0 = pad")
            t = X["text"]
            if t.device.type == "cpu" and t.numel() and bool(((t < 0) | (t >= d["text_buckets"])).any()):
                raise ValueError(f"batch['text'] has token ids outside [0, {d['text_buckets']}); rehash with "
                                 f"n_buckets={d['text_buckets']}")
        if self.text_wide is not None:
            ids = need("ngram_ids", f"the n-gram wide path ({d['ngram_buckets']} buckets)")
            check("ngram_ids", ids, ints, (None, None), "hashed n-gram ids, 0 = pad")
            check("ngram_values", need("ngram_values", "the n-gram wide path"), (torch.float32,),
                  (None, ids.shape[1]), "TF-IDF value per n-gram id")
            if ids.device.type == "cpu" and ids.numel() and bool(((ids < 0) | (ids >= d["ngram_buckets"])).any()):
                raise ValueError(f"batch['ngram_ids'] has ids outside [0, {d['ngram_buckets']}); encode with the "
                                 "FeatureProcessor fitted for this model")
        if "image" in self.modalities and "image_vec" in X:
            check("image_vec", X["image_vec"], (torch.float32,), (None, self.image_dim),
                  "the image encoder's output per row (AdPredictorNN.image on the row's pixels)")
        elif "image" in self.modalities and "image" in X:
            check("image", X["image"], (torch.uint8,), (None, d["image_fields"], d["image_channels"], None, None),
                  "raw pixels")
        if self.hierarchy is not None:
            n_groups = len(d["group_fields"])
            groups = need("groups", f"the hierarchy {self.hierarchy.fields} (group codes of {d['group_fields']})")
            check("groups", groups, ints, (None, n_groups), "group codes, 0 = pad, 1 = OOV")
            _check_codes("groups", groups, torch.tensor(d["group_cardinalities"]),
                         [f"group field {name!r}" for name in d["group_fields"]])
        for m in self.modalities:
            key = f"mask_{m}"
            if X.get(key) is not None:
                check(key, X[key], (torch.bool,), (None,), "True where the modality is present")
        if not sizes:
            raise ValueError(f"the batch holds none of this model's inputs; it needs modalities {self.modalities}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch tensors disagree on the batch size: { {k: int(v) for k, v in sizes.items()} }")
        return int(next(iter(sizes.values())))

    # ---- forward ----------------------------------------------------------------------------
    def _encode(self, X: Mapping[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor | None, torch.Tensor | None]:
        """Modality vectors (missing rows replaced), masks, raw tabular block, wide logit."""
        b = self._check_batch(X)
        device = next(self.parameters()).device
        zero = torch.zeros(b, dtype=torch.long, device=device)
        vecs: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        raw = wide = None
        for m in self.modalities:
            mask = X.get(f"mask_{m}")
            if m == "tabular":
                vec, raw = self.tabular(X.get("cat"), X.get("num"))
                if self.wide is not None:
                    wide = self.wide(X["cat"] + self.wide_offsets).sum(dim=(1, 2))
                if mask is not None:  # a missing row's raw block and wide term are zeros
                    keep = mask.to(raw.dtype)
                    raw = raw * keep.unsqueeze(1)
                    wide = None if wide is None else wide * keep.to(wide.dtype)
                if vec is None:  # lean: no tabular vector, the raw block is the tabular input
                    if mask is not None:
                        masks[m] = mask
                    continue
            elif m == "image" and "image_vec" in X:
                vec = X["image_vec"]  # the image encoder's output, computed outside (once per distinct image)
            elif (key := self.text_key if m == "text" else m) in X:
                x = X[key]
                if m == "image" and self.image_augment and self.training:
                    x = _augment_images(x)
                vec = getattr(self, m)(x)
            else:
                # Modality absent from the batch: every row is missing.
                vec, mask = None, torch.zeros(b, dtype=torch.bool, device=device)
            fill = self.missing[m](zero)
            if vec is None:
                vec = fill
            elif mask is not None:
                vec = torch.where(mask.unsqueeze(1), vec, fill)
            if self.modality_dropout is not None:
                vec = self.modality_dropout(vec, m)
            vecs[m] = vec
            if mask is not None:
                masks[m] = mask
        if self.text_wide is not None:
            text_wide = self.text_wide_logit(X)
            wide = text_wide if wide is None else wide + text_wide
        return vecs, masks, raw, wide

    def text_wide_logit(self, X: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The n-gram wide term alone [B]: sum over a row's n-grams of TF-IDF value * learned scalar."""
        if self.text_wide is None:
            raise RuntimeError("text_wide_logit needs the n-gram wide path (input_dim['ngram_buckets'] > 0)")
        weights = self.text_wide(X["ngram_ids"]).squeeze(-1) * self.text_wide_scale
        return (weights * X["ngram_values"].to(weights.dtype)).sum(dim=1)

    def _fuse(self, vecs: dict, masks: dict, raw: torch.Tensor | None) -> torch.Tensor:
        parts = [vecs[m] for m in self.modalities if m in vecs]
        if raw is not None:
            parts.append(raw)
        if self.attention is not None:
            parts.append(self.attention(vecs, masks))
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    def forward(self, X: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """AdBatch -> float32 logits [B]."""
        vecs, masks, raw, wide = self._encode(X)
        logits = self._logits_from_fused(self._fuse(vecs, masks, raw))
        logits = logits if wide is None else logits + wide.float()
        if self.hierarchy is None:
            return logits
        logits = logits + self.hierarchy(X["groups"])
        if self.training and torch.is_grad_enabled():  # the empirical-Bayes E-step's information
            self.hierarchy.observe(X["groups"], logits, X.get("weight"))
        return logits

    def feature_extraction(self, X: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fused representation fed to the tower: [B, fused_dim]."""
        vecs, masks, raw, _ = self._encode(X)
        return self._fuse(vecs, masks, raw)

    def attention_weights(self, X: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-modal attention [B, M, M] for this batch (order: `self.modalities`), no grad."""
        if self.attention is None:
            raise RuntimeError("attention_weights needs use_cross_modal=True and two or more modalities; this model "
                               f"was built without attention (modalities: {self.modalities})")
        with torch.no_grad():
            vecs, masks, _, _ = self._encode(X)
            self.attention(vecs, masks)
        return self.attention.get_attention_weights()

    # ---- embedded inputs (for gradient attributions) ----------------------------------------
    def embed_inputs(self, X: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's inputs past every integer lookup, as float tensors a gradient can reach:

        - `tabular` [B, raw_dim]: each categorical field's embedding (in `cat` order, widths
          `self.tabular.embedding_dims`), then the `num` columns;
        - `wide` [B, n_cat]: each categorical field's first-order logit term (0 for masked rows);
        - `text` [B, text_fields, D]: the text encoder's per-field vector before its projection
          (the mean token bag, or the sentence embedding);
        - `image` [B, image_fields, C, H, W]: the pixels as float32 (0..255);
        - `mask_<modality>` [B]: 1.0 where the modality is present, 0.0 where it is missing;
        - `hierarchy` [B, levels] (with a hierarchy): each level's random-effect offset.

        A modality the batch leaves out gets zeros and mask 0, as `forward` treats it.
        `forward_embedded(embed_inputs(X))` equals `forward(X)`.
        """
        if "image_vec" in X:
            raise ValueError("embed_inputs attributes pixels: pass batch['image'], not the encoded batch['image_vec']")
        b = self._check_batch(X)
        device = next(self.parameters()).device
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            key = self.text_key if m == "text" else m
            present = m == "tabular" or key in X
            mask = X.get(f"mask_{m}")
            if not present:
                mask = torch.zeros(b, dtype=torch.bool, device=device)
            elif mask is None:
                mask = torch.ones(b, dtype=torch.bool, device=device)
            out[f"mask_{m}"] = mask.to(device=device, dtype=torch.float32)
            if m == "tabular":
                out["tabular"] = self.tabular(X.get("cat"), X.get("num"))[1]
                if self.wide is not None:
                    out["wide"] = self.wide(X["cat"] + self.wide_offsets)[..., 0] * out["mask_tabular"].unsqueeze(1)
            elif m == "text":
                d = self.input_dim
                if present:
                    out["text"] = _projection_input(self.text, X[key]).reshape(b, d["text_fields"], -1)
                else:
                    out["text"] = torch.zeros(b, d["text_fields"], self.text.proj.in_features // d["text_fields"],
                                              device=device)
            else:
                d = self.input_dim
                out["image"] = (X["image"].to(torch.float32) if present else torch.zeros(
                    b, d["image_fields"], d["image_channels"], d["image_size"], d["image_size"], device=device))
        if self.hierarchy is not None:
            out["hierarchy"] = self.hierarchy.level_offsets(X["groups"]).float()
        return out

    def forward_embedded(self, embedded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B] from `embed_inputs` output, differentiable in every entry.

        Masks enter as `mask * vector + (1 - mask) * missing_vector` (and multiply the raw tabular
        block), which equals `forward`'s select at 0 and 1; the attention's key mask is
        `mask > 0.5`, a step no gradient sees. Without `wide` (or `hierarchy`) that additive term
        is left out, so an explainer can attribute it exactly and the rest by gradients.
        """
        first = next(iter(embedded.values()))
        b, device = first.shape[0], first.device
        zero = torch.zeros(b, dtype=torch.long, device=device)
        vecs: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        raw = None
        for m in self.modalities:
            keep = embedded[f"mask_{m}"]
            if m == "tabular":
                raw = embedded["tabular"] * keep.to(embedded["tabular"].dtype).unsqueeze(1)
                if self.tabular.proj is None:  # lean: no tabular vector
                    masks[m] = keep > 0.5
                    continue
                vec = self.tabular.proj(embedded["tabular"])
            elif m == "text":
                vec = self.text.proj(embedded["text"].reshape(b, -1).to(self.text.proj.weight.dtype))
            else:
                vec = self.image(embedded["image"])
            k = keep.to(vec.dtype).unsqueeze(1)
            vec = k * vec + (1 - k) * self.missing[m](zero)
            if self.modality_dropout is not None:
                vec = self.modality_dropout(vec, m)
            vecs[m], masks[m] = vec, keep > 0.5
        logits = self._logits_from_fused(self._fuse(vecs, masks, raw))
        for key in ("wide", "hierarchy"):
            if key in embedded:
                logits = logits + embedded[key].sum(dim=1).float()
        return logits

    def _logits_from_fused(self, fused: torch.Tensor) -> torch.Tensor:
        """Tower + head (+ cross head) on the fused vector: `forward`'s deep part, without the wide term."""
        logits = self.head(self.tower(fused)).squeeze(-1).float()
        if self.cross_head is not None:
            x0 = x = self.cross_norm(fused)
            for layer in self.cross:
                x = x0 * layer(x) + x
            logits = logits + self.cross_head(x).squeeze(-1).float()
        return logits

    # ---- inference copies -------------------------------------------------------------------
    def fuse_bn(self) -> AdPredictorNN:
        """An eval-mode copy with each tower Linear -> BatchNorm1d pair folded into the Linear.

        BN in eval is y = (x - mean) * g / sqrt(var + eps) + beta, an affine map, so
        W' = W * s (row-wise), b' = (b - mean) * s + beta with s = g / sqrt(var + eps).
        """
        model = copy.deepcopy(self).eval()
        layers = list(model.tower)
        for i in range(len(layers) - 1):
            lin, bn = layers[i], layers[i + 1]
            if not (isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d)):
                continue
            with torch.no_grad():
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                lin.weight.copy_((lin.weight.double() * scale.unsqueeze(1)).to(lin.weight.dtype))
                bias = lin.bias.double() if lin.bias is not None else torch.zeros_like(scale)
                new_bias = ((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(lin.weight.dtype)
                if lin.bias is None:
                    lin.bias = nn.Parameter(new_bias)
                else:
                    lin.bias.copy_(new_bias)
            layers[i + 1] = nn.Identity()
        model.tower = nn.Sequential(*layers)
        return model

    def quantize(self, calibration: Mapping[str, torch.Tensor] | None = None, smooth_alpha: float = 0.5) -> nn.Module:
        """An int8 copy for CPU inference (dynamic quantization of the Linear layers); self is untouched.

        BatchNorm is folded first, so each quantized Linear carries the whole affine map. With a
        `calibration` AdBatch (a few thousand held-out rows), SmoothQuant first moves wide input
        channels into the weights (within/nn/smoothquant.py, `smooth_alpha`); without it the
        scales are 1, which is the structure a saved int8 state is loaded into.
        torchao's int8 dynamic quantization is used when it imports and runs; otherwise
        torch.ao.quantization.quantize_dynamic, which PyTorch has deprecated in favour of torchao.
        """
        base = smooth_linears(self.fuse_bn().cpu(), calibration, smooth_alpha)
        probe = self.example_batch(self.input_dim, 4)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            model = copy.deepcopy(base)
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            with torch.no_grad():
                model(probe)
            return model
        except Exception as e:  # noqa: BLE001 - any torchao failure means: use the torch.ao path
            if not isinstance(e, ImportError):
                warnings.warn(f"torchao int8 quantization failed ({e}); using torch.ao.quantization", stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize.*deprecated", category=UserWarning)
            return torch.ao.quantization.quantize_dynamic(base, {nn.Linear}, dtype=torch.qint8)

    # ---- test / benchmark helper ------------------------------------------------------------
    @staticmethod
    def example_batch(
        input_dim: Mapping[str, Any],
        batch_size: int = 8,
        missing: Iterable[str] = (),
        seed: int = 0,
        text_len: int = 8,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """A random valid AdBatch for `input_dim`; modalities named in `missing` are masked out."""
        d = _normalise_input_dim(input_dim)
        missing = set(missing)
        unknown = missing - set(MODALITIES)
        if unknown:
            raise ValueError(f"missing={sorted(unknown)} names no modality; use a subset of {MODALITIES}")
        g = torch.Generator().manual_seed(seed)
        b = int(batch_size)
        out: dict[str, torch.Tensor] = {}
        cards = d["cat_cardinalities"]
        if cards:
            out["cat"] = torch.stack([torch.randint(1, c, (b,), generator=g) for c in cards], dim=1)
        if d["n_num"]:
            out["num"] = torch.randn(b, d["n_num"], generator=g)
        if cards or d["n_num"]:
            out["mask_tabular"] = torch.full((b,), "tabular" not in missing)
        if d["text_fields"] and d["text_embedding_dim"] and not d["text_transformer"]:
            out["text_emb"] = torch.randn(b, d["text_fields"], d["text_embedding_dim"], generator=g)
            out["mask_text"] = torch.full((b,), "text" not in missing)
        elif d["text_fields"]:
            text = torch.randint(1, d["text_buckets"], (b, d["text_fields"], text_len), generator=g)
            lengths = torch.randint(1, text_len + 1, (b, d["text_fields"], 1), generator=g)
            out["text"] = text * (torch.arange(text_len) < lengths)  # right-padded with 0
            out["mask_text"] = torch.full((b,), "text" not in missing)
        if d["text_fields"] and d["ngram_buckets"]:
            k = max(2, text_len)
            ids = torch.randint(1, d["ngram_buckets"], (b, k), generator=g)
            ids = ids * (torch.rand(b, k, generator=g) < 0.7) * ("text" not in missing)  # some padding
            values = torch.rand(b, k, generator=g) * (ids != 0)
            out["ngram_ids"], out["ngram_values"] = ids, values / values.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if d["image_fields"]:
            s = d["image_size"]
            out["image"] = torch.randint(0, 256, (b, d["image_fields"], d["image_channels"], s, s),
                                         generator=g, dtype=torch.uint8)
            out["mask_image"] = torch.full((b,), "image" not in missing)
        if d["group_cardinalities"]:
            out["groups"] = torch.stack([torch.randint(2, max(c, 3), (b,), generator=g).clamp_max(c - 1)
                                         for c in d["group_cardinalities"]], dim=1)
        out["label"] = torch.randint(0, 2, (b,), generator=g).float()
        out["weight"] = torch.ones(b)
        return {k: v.to(device) for k, v in out.items()}


__all__ = ["MODALITIES", "AdPredictorNN"]
