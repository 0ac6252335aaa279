"""Per-modality encoders: tabular, hashed text, sentence embeddings, a fine-tuned transformer, images.
Plain `nn.Module`s, no Lightning.

Layers are limited to those Opacus computes per-sample gradients for (Linear, Embedding,
EmbeddingBag, Conv2d, LayerNorm/GroupNorm), so every encoder but TransformerTextEncoder (a
Hugging Face model with DeltaLinear layers; not for DP-SGD) also trains under DP-SGD.
With `dp_compatible=True` an encoder keeps each sample's data on the batch dimension
(no folding fields into the batch), which per-sample gradients require.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from within.features.text_models import encoder_layers, mean_pool, normalises, resolve_model_path
from within.nn.lookup import IndexAddEmbedding


def auto_embedding_dim(cardinality: int, cap: int = 16) -> int:
    """Embedding width for a field with `cardinality` values: min(cap, round(1.6 * card^0.56)).

    The rule of thumb from fastai (Howard & Gugger, 2020), capped because CTR towers gain little
    from wide embeddings of a single field while the tower's input width (and cost) grows.
    """
    return max(1, min(cap, round(1.6 * cardinality**0.56)))


class TabularEncoder(nn.Module):
    """Categorical embeddings + numerics -> one vector per row.

    Args:
        cat_cardinalities: number of indices per categorical field, including 0 = pad and 1 = OOV.
        n_num: width of the numeric block `num`.
        out_dim: width of the output vector; 0: none (`forward` returns (None, raw)), for a model
            whose tower reads the raw block alone.
        embedding_dim: one width for every field; None picks `auto_embedding_dim` per field.
        embedding_dims: per-field widths (None entries fall back to `embedding_dim` / the rule).
        sparse: sparse embedding gradients (only the rows a batch touches), for LazyAdam.
        fast_backward: the table is an `IndexAddEmbedding` (within/nn/lookup.py: the same module with
            a 5x faster dense backward on CPU); False keeps nn.Embedding, which Opacus needs for DP-SGD.

    Every field lives in one table (`table`, width max(widths)): field i's value c > 0 is row
    `offsets[i] + c`, and every field's 0 (pad) is the table's shared zero row 0. One lookup and one
    (sparse) optimizer update per step instead of one per field: on a CPU, a sparse update's fixed cost per
    table dominated a 16-field step. A field narrower than the table reads the first `width` columns
    of its rows; the columns it never reads are few (only small vocabularies are narrow) and get no
    gradient. `field_embedding(i)` is field i's [cardinality, width] table.

    `forward(cat, num)` returns `(vector [B, out_dim], raw [B, raw_dim])`, where `raw` is the
    concatenated embeddings and numerics: the predictor feeds it to the tower directly too, so
    strong additive effects need not squeeze through the `out_dim` bottleneck.
    """

    def __init__(
        self,
        cat_cardinalities: Sequence[int],
        n_num: int,
        out_dim: int = 64,
        embedding_dim: int | None = None,
        embedding_dims: Sequence[int | None] | None = None,
        sparse: bool = False,
        fast_backward: bool = True,
    ) -> None:
        super().__init__()
        cards = [int(c) for c in cat_cardinalities]
        for i, c in enumerate(cards):
            if c < 2:
                raise ValueError(
                    f"cat_cardinalities[{i}]={c}: a categorical field needs at least 2 indices "
                    "(0 = pad, 1 = OOV); count them in the cardinality"
                )
        if n_num < 0:
            raise ValueError(f"n_num must be >= 0, got {n_num}")
        if not cards and n_num == 0:
            raise ValueError("TabularEncoder needs at least one categorical field or one numeric column")
        if embedding_dims is not None and len(embedding_dims) != len(cards):
            raise ValueError(
                f"embedding_dims has {len(embedding_dims)} entries but there are {len(cards)} "
                "categorical fields; give one per field (None = automatic)"
            )
        dims = []
        for i, c in enumerate(cards):
            given = embedding_dims[i] if embedding_dims is not None else None
            dims.append(int(given or embedding_dim or auto_embedding_dim(c)))
        self.cat_cardinalities = cards
        self.embedding_dims = dims
        self.n_num = int(n_num)
        self.out_dim = int(out_dim)
        self.table = None
        if cards:
            width = max(dims)
            # field i's row 0 is the shared pad row 0; its values 1..c-1 follow the fields before it
            starts = [0]
            for c in cards[:-1]:
                starts.append(starts[-1] + c - 1)
            self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long), persistent=False)
            table = IndexAddEmbedding if fast_backward else nn.Embedding
            self.table = table(1 + sum(c - 1 for c in cards), width, padding_idx=0, sparse=bool(sparse))
            # Small init: with Adam, a unit-scale table moves slowly relative to its size.
            nn.init.normal_(self.table.weight, std=0.05)
            with torch.no_grad():
                self.table.weight[0].zero_()
            narrow = any(d < width for d in dims)
            cols = [i * width + j for i, d in enumerate(dims) for j in range(d)]
            self.register_buffer("columns", torch.tensor(cols, dtype=torch.long) if narrow else None,
                                 persistent=False)
        self.raw_dim = sum(dims) + self.n_num
        self.proj = nn.Linear(self.raw_dim, self.out_dim) if self.out_dim else None

    def rows(self, cat: torch.Tensor) -> torch.Tensor:
        """Table rows of the codes cat [B, n_cat] (0 -> the pad row 0)."""
        return torch.where(cat > 0, cat + self.offsets, torch.zeros((), dtype=cat.dtype, device=cat.device))

    def field_embedding(self, i: int) -> torch.Tensor:
        """Field i's embedding table [cardinality, width] (row 0 is the pad), a view of `table`."""
        start = int(self.offsets[i])
        w = self.table.weight
        return torch.cat([w[:1], w[start + 1:start + self.cat_cardinalities[i]]])[:, :self.embedding_dims[i]]

    def embed(self, cat: torch.Tensor) -> torch.Tensor:
        """The fields' embeddings, concatenated in field order: [B, sum(embedding_dims)]."""
        flat = self.table(self.rows(cat)).flatten(1)
        return flat if self.columns is None else flat.index_select(1, self.columns)

    def forward(self, cat: torch.Tensor | None, num: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        parts = [self.embed(cat)] if self.table is not None else []
        if self.n_num:
            parts.append(num)
        raw = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return (None if self.proj is None else self.proj(raw)), raw

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # bundles written before the shared table hold one `embeddings.<i>.weight` per field
        old = [f"{prefix}embeddings.{i}.weight" for i in range(len(self.cat_cardinalities))]
        if old and all(k in state_dict for k in old):
            width = max(self.embedding_dims)
            parts = [torch.zeros(1, width)]
            for k in old:
                w = state_dict.pop(k)
                parts.append(torch.nn.functional.pad(w[1:], (0, width - w.shape[1])))
            state_dict[f"{prefix}table.weight"] = torch.cat(parts).to(parts[1].dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)


class HashedTextEncoder(nn.Module):
    """Hashed bag-of-words per text field -> one vector per row.

    All fields share one table of `n_buckets` rows (half the optimizer work of per-field tables,
    and one kernel call); a per-field projection after the bag tells the fields apart. Token 0 is
    padding and is left out of the mean; a field with no tokens gives the zero vector.

    Input `text` int64 [B, n_fields, L]. Output [B, out_dim].
    With `dp_compatible`, an nn.Embedding + masked mean replaces the EmbeddingBag: Opacus's
    EmbeddingBag sampler needs 1-D input with offsets and loops in Python per sample.
    `token_dropout` drops each token with that probability while training (word dropout): an ad's
    exact word set identifies it, and without this the tower learns per-ad train noise.
    """

    def __init__(
        self,
        n_fields: int,
        n_buckets: int,
        out_dim: int = 32,
        embedding_dim: int | None = None,
        dp_compatible: bool = False,
        token_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= token_dropout < 1.0:
            raise ValueError(f"token_dropout must be in [0, 1), got {token_dropout!r}")
        if n_fields < 1:
            raise ValueError(f"n_fields must be >= 1, got {n_fields}")
        if n_buckets < 2:
            raise ValueError(f"n_buckets must be >= 2 (0 is padding), got {n_buckets}")
        self.n_fields = int(n_fields)
        self.n_buckets = int(n_buckets)
        self.embedding_dim = int(embedding_dim or out_dim)
        self.out_dim = int(out_dim)
        self.dp_compatible = bool(dp_compatible)
        self.token_dropout = float(token_dropout)
        if self.dp_compatible:
            self.table: nn.Module = nn.Embedding(self.n_buckets, self.embedding_dim, padding_idx=0)
        else:
            self.table = nn.EmbeddingBag(self.n_buckets, self.embedding_dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.1)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.proj = nn.Linear(self.n_fields * self.embedding_dim, self.out_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        b, f, length = text.shape
        if self.training and self.token_dropout > 0:
            text = text.masked_fill(torch.rand(text.shape, device=text.device) < self.token_dropout, 0)
        if self.dp_compatible:
            emb = self.table(text)  # [B, F, L, D]
            present = (text != 0).unsqueeze(-1).to(emb.dtype)
            bags = (emb * present).sum(2) / present.sum(2).clamp_min(1.0)
        else:
            bags = self.table(text.reshape(b * f, length)).reshape(b, f, self.embedding_dim)
        return self.proj(bags.reshape(b, f * self.embedding_dim))


class EmbeddingTextEncoder(nn.Module):
    """Precomputed sentence embeddings float32 [B, n_fields, dim] -> [B, out_dim] (one Linear).

    The sentence encoder runs frozen in the FeatureProcessor (cached), so training only fits
    this projection: cheap, and Opacus-safe.
    """

    def __init__(self, n_fields: int, embedding_dim: int, out_dim: int = 32) -> None:
        super().__init__()
        if n_fields < 1 or embedding_dim < 1:
            raise ValueError(f"n_fields and embedding_dim must be >= 1, got {n_fields} and {embedding_dim}")
        self.n_fields, self.embedding_dim, self.out_dim = int(n_fields), int(embedding_dim), int(out_dim)
        self.proj = nn.Linear(self.n_fields * self.embedding_dim, self.out_dim)
        # follows .to(dtype) (bf16-true training); `proj` itself may be replaced (SmoothQuant, int8)
        self.register_buffer("_dtype_anchor", torch.zeros(0), persistent=False)

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        return self.proj(text_emb.reshape(text_emb.shape[0], -1).to(self._dtype_anchor.dtype))


class DeltaLinear(nn.Module):
    """A pretrained Linear trained at `lr_scale` times the optimizer's learning rate: W = W0 + lr_scale * dW.

    The training loop hands every parameter to one optimizer with one learning rate. Adam's step
    does not depend on the gradient's scale, so dW moves at lr and W at lr * lr_scale (exactly, for
    Adam/AdamW; SGD would see lr * lr_scale^2). W0 stays frozen, and weight decay pulls W back
    toward the pretrained weights rather than toward zero. W0 and dW are plain Parameters, not an
    inner nn.Linear, so int8 dynamic quantization (which swaps nn.Linear modules) leaves it whole.
    """

    def __init__(self, linear: nn.Linear, lr_scale: float) -> None:
        super().__init__()
        self.weight0 = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias0 = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.delta_weight = nn.Parameter(torch.zeros_like(self.weight0))
        self.delta_bias = None if linear.bias is None else nn.Parameter(torch.zeros_like(self.bias0))
        self.lr_scale = float(lr_scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight0 + self.lr_scale * self.delta_weight
        b = None if self.bias0 is None else self.bias0 + self.lr_scale * self.delta_bias
        return nn.functional.linear(x, w, b)


def _exporting() -> bool:
    """True while torch.export / ONNX traces the module: no data-dependent shapes then."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting()) or torch.jit.is_tracing()


class TransformerTextEncoder(nn.Module):
    """A Hugging Face encoder (e.g. all-MiniLM-L6-v2) inside the network, its top layers fine-tuned.

    Input `text` int64 [B, n_fields, L]: WordPiece ids, 0 = padding (FeatureProcessor with
    text_model.finetune=true). Each field is encoded by the one shared transformer, mean-pooled
    over its tokens (L2-normalised when the model's sentence-transformers config says so), and a
    Linear over the fields' vectors gives [B, out_dim]; a field with no tokens pools to zero.

    Only the Linear layers of the top `train_layers` transformer blocks train, each as a
    DeltaLinear at `lr_scale` times the head's learning rate; everything below stays frozen.
    The weights come from the local model folder (never downloaded) and are then overwritten by
    the bundle's own when a trained model is loaded.
    In eager mode a batch is cut to its longest row and duplicate rows run once (rows of one ad
    share their text); under export the graph keeps the full width.
    """

    def __init__(self, name: str, n_fields: int, out_dim: int = 32, train_layers: int = 2,
                 lr_scale: float = 0.1) -> None:
        super().__init__()
        if n_fields < 1:
            raise ValueError(f"n_fields must be >= 1, got {n_fields}")
        path = resolve_model_path(name)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the local folder only
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = encoder_layers(self.model)
        if not 1 <= int(train_layers) <= len(layers):
            raise ValueError(f"text_model.finetune_layers: {train_layers} is outside [1, {len(layers)}] "
                             f"(the model has {len(layers)} transformer layers)")
        for layer in layers[len(layers) - int(train_layers):]:
            for parent in list(layer.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, child_name, DeltaLinear(child, lr_scale))
        self.name, self.n_fields, self.out_dim = str(name), int(n_fields), int(out_dim)
        self.train_layers, self.lr_scale = int(train_layers), float(lr_scale)
        self.normalize = normalises(path)
        self.dim = int(self.model.config.hidden_size)
        self.proj = nn.Linear(self.n_fields * self.dim, self.out_dim)

    def train(self, mode: bool = True) -> TransformerTextEncoder:
        super().train(mode)
        frozen = len(encoder_layers(self.model)) - self.train_layers
        if mode:  # frozen blocks stay deterministic (no dropout), as in the frozen-embedding path
            self.model.embeddings.eval()
            for layer in encoder_layers(self.model)[:frozen]:
                layer.eval()
        return self

    def _pool(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        empty = ~mask.any(dim=1)
        # an all-padding row still attends to one position (no NaN from an empty softmax); it pools to 0 below
        mask = mask | (empty.unsqueeze(1) & (torch.arange(ids.shape[1], device=ids.device) == 0))
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        emb = mean_pool(hidden, mask.long())
        if self.normalize:
            emb = nn.functional.normalize(emb, p=2, dim=1)
        return emb * (~empty).unsqueeze(1).to(emb.dtype)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        b, f, length = text.shape
        ids = text.reshape(b * f, length)
        if _exporting():
            emb = self._pool(ids)
        else:
            used = int((ids != 0).any(dim=0).nonzero().max()) + 1 if bool((ids != 0).any()) else 1
            uniq, inverse = torch.unique(ids[:, :used], dim=0, return_inverse=True)
            emb = self._pool(uniq)[inverse]
        return self.proj(emb.reshape(b, f * self.dim).to(self.proj.weight.dtype))


class SimpleCNNImageEncoder(nn.Module):
    """Small CNN for small images: 3 strided 3x3 convs, global mean pool, Linear.

    With `pixel_stats` the pooled CNN features are joined by per-channel mean and std and the
    luminance std (colour balance, brightness, contrast): classic creative features that a small
    CNN learns only slowly from the few thousand distinct creatives a campaign log holds.
    No BatchNorm (it mixes samples, which DP-SGD forbids); pixels are scaled to [-0.5, 0.5].
    Input `image` uint8 [B, n_images, C, H, W]; one CNN is shared by all image fields, and a
    Linear over the concatenated per-image vectors gives [B, out_dim].
    """

    def __init__(
        self,
        n_images: int,
        channels: int = 3,
        out_dim: int = 32,
        widths: Sequence[int] = (16, 32, 32),
        dp_compatible: bool = False,
        pixel_stats: bool = True,
    ) -> None:
        super().__init__()
        if n_images < 1 or channels < 1:
            raise ValueError(f"n_images and channels must be >= 1, got {n_images} and {channels}")
        self.n_images = int(n_images)
        self.channels = int(channels)
        self.out_dim = int(out_dim)
        self.dp_compatible = bool(dp_compatible)
        layers: list[nn.Module] = []
        c_in = self.channels
        for w in widths:
            layers += [nn.Conv2d(c_in, int(w), 3, stride=2, padding=1), nn.ReLU()]
            c_in = int(w)
        self.convs = nn.Sequential(*layers)
        self.pixel_stats = bool(pixel_stats)
        n_stats = 2 * self.channels + 1 if self.pixel_stats else 0
        self.per_image = nn.Linear(c_in + n_stats, self.out_dim)
        self.proj = nn.Linear(self.n_images * self.out_dim, self.out_dim) if self.n_images > 1 else nn.Identity()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.convs[0].weight.dtype) / 255.0 - 0.5
        feats = self.convs(x).mean(dim=(2, 3))
        if self.pixel_stats:
            lum = x.mean(dim=1).flatten(1)
            stats = [x.mean(dim=(2, 3)), x.flatten(2).std(dim=2), lum.std(dim=1, keepdim=True)]
            feats = torch.cat([feats, *stats], dim=1)
        return self.per_image(feats)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, n = image.shape[:2]
        if self.dp_compatible:
            # One call per field keeps the batch dimension = samples, as per-sample grads need.
            vecs = [self._encode(image[:, i]) for i in range(n)]
            flat = torch.cat(vecs, dim=1)
        else:
            flat = self._encode(image.reshape(b * n, *image.shape[2:])).reshape(b, n * self.out_dim)
        return self.proj(flat)


class TimmImageEncoder(nn.Module):
    """Any timm backbone as the image encoder: uint8 [B, n_images, C, H, W] -> [B, out_dim].

    Args:
        name: a timm model name, e.g. "resnet18" or "mobilenetv3_small_050".
        pretrained: download timm's weights (needs network access).
        weights_path: a local `.safetensors` file (or a torch state dict, loaded with
            weights_only=True so it cannot run code) for the backbone.
        dp_compatible: replace BatchNorm with GroupNorm via opacus' ModuleValidator.fix.
    """

    def __init__(
        self,
        name: str,
        n_images: int = 1,
        channels: int = 3,
        out_dim: int = 32,
        pretrained: bool = False,
        weights_path: str | None = None,
        dp_compatible: bool = False,
    ) -> None:
        super().__init__()
        try:
            timm = importlib.import_module("timm")
        except ImportError as e:
            raise ImportError(
                f"image_encoder={name!r} needs the `timm` package, which is not installed: "
                "`pip install timm`, or use image_encoder='simple_cnn'"
            ) from e
        try:
            backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=channels)
        except RuntimeError as e:
            raise ValueError(f"image_encoder={name!r}: timm cannot build it ({e}); see timm.list_models()") from e
        if weights_path is not None:
            backbone.load_state_dict(_load_state_dict(weights_path), strict=False)
        if dp_compatible:
            from opacus.validators import ModuleValidator

            backbone = ModuleValidator.fix(backbone)
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.5,) * channels)[:channels], dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.5,) * channels)[:channels], dtype=torch.float32)
        if mean.numel() != channels:  # a single-channel config, or fewer channels than the image
            mean, std = mean.mean().repeat(channels), std.mean().repeat(channels)
        self.register_buffer("mean", mean.view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, channels, 1, 1), persistent=False)
        self.name = name
        self.n_images = int(n_images)
        self.out_dim = int(out_dim)
        self.dp_compatible = bool(dp_compatible)
        self.backbone = backbone
        self.proj = nn.Linear(self.n_images * int(backbone.num_features), self.out_dim)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        return self.backbone(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, n = image.shape[:2]
        if self.dp_compatible:
            flat = torch.cat([self._encode(image[:, i]) for i in range(n)], dim=1)
        else:
            flat = self._encode(image.reshape(b * n, *image.shape[2:])).reshape(b, -1)
        return self.proj(flat)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights_path={path!r} does not exist; give a .safetensors file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(str(p), map_location="cpu", weights_only=True)


def build_image_encoder(
    image_encoder: str,
    n_images: int,
    channels: int,
    out_dim: int,
    dp_compatible: bool = False,
    pretrained: bool = False,
    weights_path: str | None = None,
) -> nn.Module:
    """`simple_cnn` or a timm model name -> an encoder mapping uint8 images to [B, out_dim]."""
    if image_encoder == "simple_cnn":
        return SimpleCNNImageEncoder(n_images, channels, out_dim, dp_compatible=dp_compatible)
    return TimmImageEncoder(
        image_encoder, n_images, channels, out_dim, pretrained=pretrained, weights_path=weights_path,
        dp_compatible=dp_compatible,
    )


__all__ = [
    "DeltaLinear",
    "EmbeddingTextEncoder",
    "HashedTextEncoder",
    "SimpleCNNImageEncoder",
    "TabularEncoder",
    "TimmImageEncoder",
    "TransformerTextEncoder",
    "auto_embedding_dim",
    "build_image_encoder",
]
