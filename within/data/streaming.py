"""Streaming training rows: more rows than memory holds, read shard by shard, never materialised.

A *row source* serves row ranges of a fixed, ordered table without holding it:

* `SimulatorRows`: ``simulate(n, ...)``, one shard per simulator block (``BLOCK_ROWS`` rows, each
  drawn from its own seed, so a shard is the same rows whoever draws it, in whatever order);
* `ParquetRows` (within/data/loaders/parquet_file.py): one shard per row group.

The split is by row position (row order is time order: the simulator is time-ordered, and a
Parquet file must be written in time order for ``split.method=time``): train is the first rows,
then val, calib and test. Only bounded slices are materialised (`stream_splits`): the first
`eval_rows` rows of each of val / calib / test, and a fitting sample of `fit_rows` train rows
spread over the train range, on which the FeatureProcessor learns its vocabularies and statistics.

`StreamingAdDataset` yields processed batches of the train range. Shards are dealt to DDP ranks
(``shard % world``) and then to DataLoader workers (``get_worker_info``), so each row goes to
exactly one (rank, worker). Each epoch a worker visits its shards in an order drawn from
``(seed, epoch, rank, worker)`` and mixes `buffer_shards` shards at a time: their rows (plus the
rows left over from the previous buffer) are transformed together, permuted, and cut into batches;
the last batch of a worker takes the remainder. Under DDP every rank must take the same number of
steps, so a rank with fewer rows repeats batches from the start of its stream (``even_ranks``):
the only rows seen twice in an epoch.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from within.features.processor import FeatureProcessor

EVAL_SPLITS = ("val", "calib", "test")


class RowSource(Protocol):
    """An ordered table served by row range."""

    n_rows: int

    def shard_bounds(self) -> np.ndarray: ...          # sorted offsets 0 = b_0 < ... < b_k = n_rows

    def rows(self, lo: int, hi: int) -> pd.DataFrame: ...  # rows lo:hi, index = row position


class SimulatorRows:
    """``simulate(n, seed, **knobs)`` as a row source; shards are the simulator's seeded blocks."""

    def __init__(self, n: int = 300_000, seed: int = 7, **knobs: Any) -> None:
        self.n_rows = int(n)
        if self.n_rows < 1:
            raise ValueError(f"data.source.n: need at least 1 row, got {n}")
        self.seed, self.knobs = seed, knobs
        self._sim: Any = None

    @property
    def sim(self) -> Any:
        """The simulator's world, built on first use (deciding whether to stream needs only n)."""
        if self._sim is None:
            from within.data.simulator import AdMarketSimulator

            self._sim = AdMarketSimulator(seed=self.seed, **self.knobs)
        return self._sim

    def shard_bounds(self) -> np.ndarray:
        from within.data.simulator import BLOCK_ROWS

        return np.unique(np.r_[np.arange(0, self.n_rows, BLOCK_ROWS), self.n_rows])

    def rows(self, lo: int, hi: int) -> pd.DataFrame:
        return self.sim.rows(self.n_rows, lo, hi)


def row_source(source: Any) -> RowSource | None:
    """The row source behind a configured `data.source` partial, or None when it cannot stream.

    Streams: ``within.data.simulator.simulate`` and ``within.data.loaders.csv_file.load`` /
    ``parquet_file.load`` on a ``.parquet`` file.
    """
    func, kw = getattr(source, "func", None), dict(getattr(source, "keywords", {}) or {})
    if func is None:
        return None
    from pathlib import Path

    from within.data.loaders import csv_file, parquet_file
    from within.data.simulator import simulate

    if func is simulate:
        return SimulatorRows(**kw)
    if func in (csv_file.load, parquet_file.load):
        file, root = kw.get("file"), kw.get("root")
        if file is None or Path(str(file)).suffix.lower() != ".parquet":
            return None
        path = Path(root).expanduser() / file if root is not None else Path(file).expanduser()
        return parquet_file.ParquetRows(path, kw.get("spec"), label=kw.get("label"), rename=kw.get("rename"))
    return None


def split_ranges(n: int, val_frac: float, calib_frac: float, test_frac: float) -> dict[str, tuple[int, int]]:
    """train / val / calib / test as consecutive row ranges (time order), sized like `split_frame`."""
    sizes = [round(n * f) for f in (val_frac, calib_frac, test_frac)]
    n_train = n - sum(sizes)
    if n_train < 1 or sizes[2] < 1:
        raise ValueError(f"data: {n} rows is too few to split (train {n_train}, val/calib/test {sizes})")
    cuts = np.cumsum([0, n_train, *sizes])
    return {name: (int(cuts[i]), int(cuts[i + 1])) for i, name in enumerate(("train", *EVAL_SPLITS))}


def clip_shards(bounds: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The source's shards cut to the row range lo:hi (empty pieces dropped)."""
    edges = np.unique(np.clip(np.asarray(bounds, dtype=np.int64), lo, hi))
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def fit_sample(rows: RowSource, shards: list[tuple[int, int]], fit_rows: int, max_shards: int = 8) -> pd.DataFrame:
    """About `fit_rows` train rows from up to `max_shards` shards spread evenly over the train range."""
    if fit_rows < 1:
        raise ValueError(f"data.stream_fit_rows: need >= 1, got {fit_rows}")
    k = min(len(shards), max_shards)
    picks = np.unique(np.linspace(0, len(shards) - 1, k).round().astype(int))
    per = math.ceil(fit_rows / len(picks))
    parts = [rows.rows(lo, min(hi, lo + per)) for lo, hi in (shards[i] for i in picks)]
    return pd.concat(parts) if len(parts) > 1 else parts[0]


def stream_splits(rows: RowSource, ranges: Mapping[str, tuple[int, int]], eval_rows: int,
                  fit_rows: int) -> dict[str, pd.DataFrame]:
    """The materialised frames: 'train' is the fitting sample, val / calib / test their first rows."""
    if eval_rows < 1:
        raise ValueError(f"data.stream_eval_rows: need >= 1, got {eval_rows}")
    frames = {"train": fit_sample(rows, clip_shards(rows.shard_bounds(), *ranges["train"]), fit_rows)}
    for name in EVAL_SPLITS:
        lo, hi = ranges[name]
        frames[name] = rows.rows(lo, min(hi, lo + eval_rows)) if hi > lo else rows.rows(lo, lo)
    return {k: v.reset_index(drop=True) for k, v in frames.items()}


def _batches_in(n: int, batch_size: int) -> int:
    """Batches a stream of n rows is cut into: full ones, the remainder joining the last when it is one row."""
    if n <= 0:
        return 0
    b = math.ceil(n / batch_size)
    return b - 1 if b > 1 and n % batch_size == 1 else b


class StreamingAdDataset(IterableDataset):
    """Processed AdBatch dicts of the train row range, sharded over ranks and DataLoader workers.

    `rank` / `world_size` default to torch.distributed's (resolved in the main process by
    `bind_rank`, since workers have no process group); pass them to simulate ranks.
    """

    def __init__(self, rows: RowSource, lo: int, hi: int, processor: FeatureProcessor, batch_size: int,
                 seed: int = 0, shuffle: bool = True, buffer_shards: int = 4, rank: int | None = None,
                 world_size: int | None = None, even_ranks: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if buffer_shards < 1:
            raise ValueError(f"data.stream_buffer_shards: need >= 1, got {buffer_shards}")
        self.rows, self.processor = rows, processor
        self.shards = clip_shards(rows.shard_bounds(), lo, hi)
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.buffer_shards, self.even_ranks = int(buffer_shards), bool(even_ranks)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    # ---------------------------------------------------------------- assignment
    def bind_rank(self) -> None:
        """Fix rank / world size from torch.distributed (when running under it and not given)."""
        if self.rank is None or self.world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            self.rank = torch.distributed.get_rank() if dist else 0
            self.world_size = torch.distributed.get_world_size() if dist else 1
        if len(self.shards) < self.world_size:
            raise ValueError(
                f"data: {len(self.shards)} train shards cannot feed {self.world_size} ranks; use more rows "
                "(data.source.n), smaller Parquet row groups, or fewer devices"
            )

    def _rank_world(self) -> tuple[int, int]:
        self.bind_rank()
        return int(self.rank), int(self.world_size)

    def rank_shards(self, rank: int) -> list[tuple[int, int]]:
        return self.shards[rank :: self._rank_world()[1]]

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _worker_batches(self, rank: int, worker: int, workers: int) -> int:
        shards = self.rank_shards(rank)[worker::workers]
        return _batches_in(sum(b - a for a, b in shards), self.batch_size)

    def _rank_batches(self, rank: int, workers: int) -> int:
        return sum(self._worker_batches(rank, w, workers) for w in range(workers))

    def _target_batches(self, workers: int) -> int:
        """Batches each rank yields: its own, or the most of any rank under `even_ranks`."""
        rank, world = self._rank_world()
        if world > 1 and self.even_ranks:
            return max(self._rank_batches(r, workers) for r in range(world))
        return self._rank_batches(rank, workers)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all its workers). Assumes the loader's workers."""
        return self._target_batches(getattr(self, "num_workers", 1) or 1)

    # ---------------------------------------------------------------- iteration
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _stream(self, shards: list[tuple[int, int]], rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        from within.data.datamodule import AdTensorDataset

        carry: pd.DataFrame | None = None
        bs = self.batch_size
        for start in range(0, len(shards), self.buffer_shards):
            parts = ([carry] if carry is not None and len(carry) else []) + [
                self.rows.rows(lo, hi) for lo, hi in shards[start : start + self.buffer_shards]
            ]
            frame = pd.concat(parts) if len(parts) > 1 else parts[0]
            last = start + self.buffer_shards >= len(shards)
            n = len(frame)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            n_out = _batches_in(n, bs) if last else n // bs
            keep = n if last else n_out * bs
            carry = frame.iloc[np.sort(order[keep:])] if keep < n else None
            if n_out == 0:
                continue
            ds = AdTensorDataset(self.processor.transform(frame, with_label=True, dedupe_images=True))
            for b in range(n_out):
                end = keep if b == n_out - 1 else (b + 1) * bs
                yield ds[order[b * bs : end]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, _ = self._rank_world()
        worker, workers = self._worker()
        epoch = self.epoch
        self.epoch += 1  # each worker's copy counts its own passes (persistent workers keep it)
        shards = self.rank_shards(rank)[worker::workers]
        rng = np.random.default_rng([self.seed, epoch, rank, worker])
        if self.shuffle:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        yield from self._stream(shards, rng)
        deficit = self._target_batches(workers) - self._rank_batches(rank, workers)
        if deficit > 0 and worker == 0:  # even_ranks: this rank repeats its first batches
            pad = np.random.default_rng([self.seed, epoch, rank, worker, 1])
            while deficit > 0:
                for batch in self._stream(shards or self.rank_shards(rank)[:1], pad):
                    yield batch
                    deficit -= 1
                    if deficit == 0:
                        break
