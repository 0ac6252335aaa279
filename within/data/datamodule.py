"""AdDataModule: a DataFrame source -> time-aware splits -> FeatureProcessor (train only) -> AdBatch loaders.

Batches are gathered whole from in-memory tensors (one index array per batch): per-row
Dataset.__getitem__ + collate costs more than the model on CTR-sized rows.

Above `stream_threshold` rows (or with `stream=true`) a source that can stream (the simulator, a
Parquet file) is never materialised: train batches come from within/data/streaming.py, shard by
shard, and only bounded slices (the processor's fitting sample, the first `stream_eval_rows` rows
of val / calib / test) are held in memory.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec


class AdTensorDataset(Dataset):
    """Columns of AdBatch tensors; `ds[index_array]` returns a whole batch dict."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        arrays = dict(arrays)
        self._image_table = torch.as_tensor(arrays.pop("image_table")) if "image_table" in arrays else None
        self._image_index = torch.as_tensor(arrays.pop("image_index")) if "image_index" in arrays else None
        # sentence embeddings: one row per distinct (text fields) tuple, gathered per batch
        self._text_table = torch.as_tensor(arrays.pop("text_emb_table")) if "text_emb_table" in arrays else None
        self._text_index = torch.as_tensor(arrays.pop("text_emb_index")) if "text_emb_index" in arrays else None
        self.tensors = {k: torch.as_tensor(v) for k, v in arrays.items()}
        self.n = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        batch = {k: v[idx] for k, v in self.tensors.items()}
        if self._image_table is not None:
            batch["image"] = self._image_table[self._image_index[idx]]
        if self._text_table is not None:
            batch["text_emb"] = self._text_table[self._text_index[idx]]
        return batch

    def full(self) -> dict[str, torch.Tensor]:
        return self[np.arange(self.n)]


class BatchIndexSampler(Sampler[np.ndarray]):
    """Yields index arrays of one batch each; shuffles per epoch (seed + epoch) and shards across ranks.

    Under DDP every rank gets the same number of batches (indices wrap), so no rank waits forever.
    When shuffling (training), a last batch of one row joins the batch before it: BatchNorm cannot
    normalise a single row.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return np.arange(self.n)

    def __iter__(self) -> Iterator[np.ndarray]:
        rank, world = self._rank_world()
        idx = self._indices()
        per_rank = math.ceil(self.n / world)
        idx = np.resize(idx, per_rank * world)[rank::world]  # wrap so every rank has per_rank rows
        n_batches = self._n_batches(len(idx))
        for b in range(n_batches):
            end = len(idx) if b == n_batches - 1 and not self.drop_last else (b + 1) * self.batch_size
            yield idx[b * self.batch_size : end]

    def _n_batches(self, rows: int) -> int:
        if self.drop_last:
            return rows // self.batch_size
        n = math.ceil(rows / self.batch_size)
        return n - 1 if self.shuffle and n > 1 and rows % self.batch_size == 1 else n

    def __len__(self) -> int:
        _, world = self._rank_world()
        return self._n_batches(math.ceil(self.n / world))


SPLITS = ("train", "val", "calib", "test")
DROPPABLE = ("text", "image")
DROP_SPLITS = ("train", "val", "calib")  # the rows a model learns, early-stops and calibrates on; test stays whole


def drop_modalities(
    frames: Mapping[str, pd.DataFrame], spec: FeatureSpec, rates: Mapping[str, float], seed: int,
    splits: tuple[str, ...] = DROP_SPLITS,
) -> dict[str, pd.DataFrame]:
    """Copies of `frames` where each row of `splits` loses its text / image with probability `rates[m]`.

    A dropped image becomes None and dropped text the empty string, which is how the processor
    marks a missing modality (mask_image / mask_text False -> the model's learned stand-in and the
    CrossModalAttention masks). Draws are independent per modality, seeded by (seed, split).
    """
    rates = {m: float(r) for m, r in dict(rates or {}).items()}
    bad = sorted(set(rates) - set(DROPPABLE))
    if bad:
        raise ValueError(f"data.drop_modality: unknown modalities {bad}; allowed: {list(DROPPABLE)}")
    for m, r in rates.items():
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"data.drop_modality.{m}: a rate in [0, 1], got {r}")
        if r > 0 and not (spec.text if m == "text" else spec.image):
            raise ValueError(f"data.drop_modality.{m}: the features spec has no {m} field to drop")
    out = dict(frames)
    for k, name in enumerate(SPLITS):
        frame = frames.get(name)
        if name not in splits or frame is None or not len(frame) or not any(rates.values()):
            continue
        rng = np.random.default_rng([int(seed), 7919, k])
        frame = frame.copy()
        for m in DROPPABLE:
            drop = rng.random(len(frame)) < rates.get(m, 0.0)
            if not drop.any():
                continue
            for f in spec.text if m == "text" else spec.image:
                col = frame[f.name].astype(object).to_numpy(copy=True)
                col[drop] = "" if m == "text" else None
                frame[f.name] = col
        out[name] = frame
    return out


def split_frame(
    df: pd.DataFrame, spec: FeatureSpec, method: str, val_frac: float, test_frac: float, seed: int,
    calib_frac: float = 0.0,
) -> dict[str, pd.DataFrame]:
    """train / val (early stopping) / calib (post-fit calibration) / test, in time order or seeded at random.

    By time, each later split is strictly newer than the one before: no leakage from the future.
    """
    fracs = {"val_frac": val_frac, "calib_frac": calib_frac, "test_frac": test_frac}
    bad = {k: v for k, v in fracs.items() if not 0 <= v < 1}
    if bad or test_frac <= 0 or sum(fracs.values()) >= 1:
        raise ValueError(
            f"data.split: need each fraction in [0, 1), test_frac > 0 and their sum < 1; got {fracs}"
        )
    n = len(df)
    if method == "time":
        order = (
            np.argsort(df[spec.time].to_numpy(), kind="stable") if spec.time and spec.time in df else np.arange(n)
        )
    elif method == "random":
        order = np.random.default_rng(seed).permutation(n)
    else:
        raise ValueError(f"data.split.method: {method!r} is not 'time' or 'random'")
    sizes = [int(round(n * f)) for f in (val_frac, calib_frac, test_frac)]
    n_train = n - sum(sizes)
    if n_train < 1 or sizes[2] < 1:
        raise ValueError(f"data: {n} rows is too few to split (train {n_train}, val/calib/test {sizes})")
    cuts = np.cumsum([n_train, sizes[0], sizes[1]])
    parts = np.split(order, cuts)
    return {
        name: df.iloc[np.sort(p) if method == "time" else p].reset_index(drop=True)
        for name, p in zip(SPLITS, parts)
    }


class AdDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: Callable[[], pd.DataFrame] | pd.DataFrame,
        features: Mapping[str, Any] | FeatureSpec | None = None,
        split: Mapping[str, Any] | None = None,
        batch_size: int = 1024,
        eval_batch_size: int = 8192,
        num_workers: int = 0,
        seed: int = 0,
        processor: FeatureProcessor | None = None,
        poisson_sampling: bool = False,
        text_model: Mapping[str, Any] | str | None = None,
        drop_modality: Mapping[str, float] | None = None,
        stream: bool | None = None,
        stream_threshold: int = 2_000_000,
        stream_eval_rows: int = 100_000,
        stream_fit_rows: int = 131_072,
        stream_buffer_shards: int = 4,
    ) -> None:
        super().__init__()
        if features is None and processor is None:
            raise ValueError("AdDataModule: pass `features` (a FeatureSpec or its config) or a fitted `processor`")
        self.source = source
        self.spec = processor.spec if processor is not None else (
            features if isinstance(features, FeatureSpec) else FeatureSpec.from_config(features)
        )
        split = dict(split or {})
        self.split_method = split.pop("method", "time")
        self.val_frac = float(split.pop("val_frac", 0.1))
        self.test_frac = float(split.pop("test_frac", 0.2))
        self.calib_frac = float(split.pop("calib_frac", 0.0))
        if split:
            raise ValueError(
                f"data.split: unknown keys {sorted(split)}; allowed: method, val_frac, calib_frac, test_frac"
            )
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.processor = processor
        self.text_model = text_model  # None / "hashing": the hashing tokenizer; else a sentence encoder
        self.frames: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, AdTensorDataset] = {}
        self.train_sampler: Sampler | None = None
        # DP-SGD's accounting assumes each row joins each batch independently with rate q
        self.poisson_sampling = bool(poisson_sampling)
        # e.g. {text: 0.3, image: 0.3}: that share of train/val/calib rows lose the modality (ablations)
        self.drop_modality = dict(drop_modality or {})
        # streaming (within/data/streaming.py): null = on when the source streams and has > stream_threshold rows
        self.stream = None if stream is None else bool(stream)
        self.stream_threshold, self.stream_eval_rows = int(stream_threshold), int(stream_eval_rows)
        self.stream_fit_rows, self.stream_buffer_shards = int(stream_fit_rows), int(stream_buffer_shards)
        self._rows: Any = None
        self.stream_ranges: dict[str, tuple[int, int]] = {}

    @property
    def streaming(self) -> bool:
        """Whether train rows stream (decided once, from `stream` and the source's row count)."""
        if self.stream is False:
            return False
        if self._rows is None:
            from within.data.streaming import row_source

            self._rows = row_source(self.source) or False
        if not self._rows:
            if self.stream:
                raise ValueError(
                    "data.stream=true: this data.source cannot stream; streaming sources are the simulator "
                    "(data=synthetic) and Parquet files (data=csv data.source.file=rows.parquet)"
                )
            return False
        return bool(self.stream) or self._rows.n_rows > self.stream_threshold

    def load_frame(self) -> pd.DataFrame:
        df = self.source() if callable(self.source) else self.source
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"data.source must return a pandas DataFrame, got {type(df).__name__}")
        return df

    def split(self) -> dict[str, pd.DataFrame]:
        """Load, validate and split the rows, once (no tensors: what models without a processor need)."""
        if not self.frames and self.streaming:
            self.frames = self._stream_frames()
        if not self.frames:
            df = self.load_frame()
            self.spec.validate_frame(df, require_label=True)
            frames = split_frame(
                df, self.spec, self.split_method, self.val_frac, self.test_frac, self.seed, self.calib_frac
            )
            if self.drop_modality:
                frames = drop_modalities(frames, self.spec, self.drop_modality, self.seed)
            self.frames = frames
        return self.frames

    def _stream_frames(self) -> dict[str, pd.DataFrame]:
        from within.data.streaming import split_ranges, stream_splits

        if self.split_method != "time":
            raise ValueError(f"data.split.method={self.split_method}: streamed rows split by position (time order); "
                             "set data.split.method=time or data.stream=false")
        if self.drop_modality or self.poisson_sampling:
            key = "data.drop_modality" if self.drop_modality else "data.poisson_sampling (privacy=dp)"
            raise ValueError(f"{key} needs the rows in memory; set data.stream=false")
        self.stream_ranges = split_ranges(self._rows.n_rows, self.val_frac, self.calib_frac, self.test_frac)
        frames = stream_splits(self._rows, self.stream_ranges, self.stream_eval_rows, self.stream_fit_rows)
        for frame in frames.values():
            if len(frame):
                self.spec.validate_frame(frame, require_label=True)
        return frames

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.split()
        if self.processor is None:
            # train only: no leakage (streaming: the bounded fitting sample of the train range)
            self.processor = FeatureProcessor(self.spec, text_model=self.text_model).fit(self.frames["train"])
        for name, frame in self.frames.items():
            if name == "train" and self.stream_ranges:
                from within.data.streaming import StreamingAdDataset

                self.datasets[name] = StreamingAdDataset(
                    self._rows, *self.stream_ranges["train"], processor=self.processor, batch_size=self.batch_size,
                    seed=self.seed, buffer_shards=self.stream_buffer_shards,
                )
            elif len(frame):
                self.datasets[name] = AdTensorDataset(
                    self.processor.transform(frame, with_label=True, dedupe_images=True)
                )

    @property
    def n_train(self) -> int:
        if self.stream_ranges:
            lo, hi = self.stream_ranges["train"]
            return hi - lo
        return len(self.frames.get("train", ()))

    @property
    def sample_rate(self) -> float:
        """Expected batch fraction q = batch_size / n_train (the DP accountant's sampling rate)."""
        return min(1.0, self.batch_size / max(1, self.n_train))

    def _poisson_sampler(self) -> Sampler:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        from within.privacy.sampling import DistributedPoissonSampler

        n = len(self.datasets["train"])
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        # one stream per rank: shared seeds would make rows of different ranks join batches together
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)
        if distributed:
            # each rank draws its own disjoint shard at rate q: the GLOBAL expected batch is batch_size
            # (q = batch_size / N, as the accountant uses); every rank yields floor(1/q) batches, empty ones
            # included, so all ranks step (and all-reduce) the same number of times
            return DistributedPoissonSampler(
                total_size=n, sample_rate=self.sample_rate, shuffle_seed=self.seed, generator=generator
            )
        return UniformWithReplacementSampler(num_samples=n, sample_rate=self.sample_rate, generator=generator)

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        ds = self.datasets[name]
        if name == "train" and self.stream_ranges:
            ds.num_workers = self.num_workers
            ds.bind_rank()  # here, in the main process: workers have no process group
            return DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        if name == "train" and self.poisson_sampling:
            sampler = self._poisson_sampler()
        else:
            sampler = BatchIndexSampler(len(ds), batch_size, shuffle=shuffle, seed=self.seed)
        if name == "train":
            self.train_sampler = sampler
        return DataLoader(
            ds,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val" if "val" in self.datasets else "test", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
