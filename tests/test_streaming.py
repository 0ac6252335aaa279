"""Streaming train rows (within/data/streaming.py): sharding, order, Parquet, and a train.py run."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch.utils.data import DataLoader

from within.data.datamodule import AdDataModule
from within.data.loaders.csv_file import load as load_csv
from within.data.loaders.parquet_file import ParquetRows
from within.data.simulator import BLOCK_ROWS, AdMarketSimulator, simulate
from within.data.streaming import SimulatorRows, StreamingAdDataset, clip_shards, split_ranges
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureError, FeatureSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"label": "y", "truth": "row", "time": None, "weight": None,
        "fields": [{"name": "color", "type": "categorical"}, {"name": "x", "type": "numeric"}]}


class FrameRows:
    """A row source over an in-memory frame with shards of `shard` rows (the test's stand-in)."""

    def __init__(self, df: pd.DataFrame, shard: int) -> None:
        self.df, self.n_rows = df, len(df)
        self.bounds = np.unique(np.r_[np.arange(0, len(df), shard), len(df)])

    def shard_bounds(self) -> np.ndarray:
        return self.bounds

    def rows(self, lo: int, hi: int) -> pd.DataFrame:
        return self.df.iloc[lo:hi]


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"color": rng.choice(["red", "green", "blue"], n), "x": rng.normal(size=n),
                         "y": rng.integers(0, 2, n), "row": np.arange(n, dtype=np.float64)})


def _processor(df: pd.DataFrame) -> FeatureProcessor:
    return FeatureProcessor(FeatureSpec.from_config(SPEC)).fit(df)


def _rows_seen(ds: StreamingAdDataset, workers: int) -> list[np.ndarray]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [b["truth"].numpy().astype(np.int64) for b in loader]


def test_every_train_row_once_across_two_workers_and_two_ranks():
    df = _frame(2_000)
    rows, proc = FrameRows(df, shard=130), _processor(df)
    seen = []
    for rank in range(2):
        ds = StreamingAdDataset(rows, 100, 1_900, proc, batch_size=64, seed=3, buffer_shards=2,
                                rank=rank, world_size=2, even_ranks=False)
        ds.num_workers = 2
        batches = _rows_seen(ds, workers=2)
        assert len(batches) == len(ds)
        assert all(len(b) <= 65 for b in batches) and sum(len(b) == 64 for b in batches) >= len(batches) - 4
        seen.append(np.concatenate(batches))
    both = np.concatenate(seen)
    assert np.array_equal(np.sort(both), np.arange(100, 1_900))  # each row once, none from outside the range
    assert not set(seen[0]) & set(seen[1])


def test_even_ranks_take_the_same_number_of_steps():
    df = _frame(1_000)
    rows, proc = FrameRows(df, shard=300), _processor(df)  # shards 300, 300, 300, 100: rank 1 has fewer rows
    counts = []
    for rank in range(2):
        ds = StreamingAdDataset(rows, 0, 1_000, proc, batch_size=50, seed=0, rank=rank, world_size=2)
        ds.num_workers = 1
        batches = _rows_seen(ds, workers=0)
        assert len(batches) == len(ds)
        counts.append(len(batches))
    assert counts[0] == counts[1] == 12  # rank 0: 600 rows, 12 batches; rank 1: 400 rows + 4 repeated
    with pytest.raises(ValueError, match="train shards cannot feed 5 ranks"):
        StreamingAdDataset(rows, 0, 1_000, proc, batch_size=50, rank=0, world_size=5).bind_rank()


def test_order_is_fixed_by_the_seed_and_changes_per_epoch():
    df = _frame(1_500)
    rows, proc = FrameRows(df, shard=200), _processor(df)

    def epochs(seed: int, n: int = 2) -> list[np.ndarray]:
        ds = StreamingAdDataset(rows, 0, 1_500, proc, batch_size=100, seed=seed, buffer_shards=3)
        return [np.concatenate([b["truth"].numpy() for b in ds]) for _ in range(n)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[1]) and np.array_equal(np.sort(a[0]), np.sort(a[1]))
    # buffers mix rows of several shards: the first batch draws from more than one shard
    assert len(np.unique(a[0][:100] // 200)) > 1
    fixed = StreamingAdDataset(rows, 0, 1_500, proc, batch_size=100, shuffle=False)
    assert np.array_equal(np.concatenate([b["truth"].numpy() for b in fixed]), np.arange(1_500))


def test_parquet_streams_by_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = _frame(1_000, seed=4)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(df.assign(extra=1), preserve_index=False), path, row_group_size=128)
    rows = ParquetRows(path, SPEC)
    assert rows.n_rows == 1_000 and rows.columns == ["color", "x", "y", "row"]  # `extra` is not read
    assert list(rows.shard_bounds()) == [*range(0, 1_000, 128), 1_000]
    part = rows.rows(100, 300)  # straddles row groups 0-2
    assert list(part.index) == list(range(100, 300))
    pd.testing.assert_frame_equal(part.reset_index(drop=True), df.iloc[100:300].reset_index(drop=True),
                                  check_dtype=False)
    ranges = split_ranges(rows.n_rows, 0.1, 0.0, 0.2)
    ds = StreamingAdDataset(rows, *ranges["train"], _processor(df), batch_size=64, seed=0, rank=0, world_size=1)
    ds.num_workers = 2
    seen = np.concatenate(_rows_seen(ds, workers=2))
    assert np.array_equal(np.sort(seen), np.arange(*ranges["train"]))
    # the whole file through data=csv's loader, checked like a CSV
    whole = load_csv(None, file=str(path), spec=SPEC)
    assert len(whole) == 1_000 and whole["y"].dtype == np.int64
    pq.write_table(pa.Table.from_pandas(df.assign(y=df["y"] * 2)), tmp_path / "bad.parquet")
    with pytest.raises(FeatureError, match="column 'y': expected 0 or 1"):
        load_csv(None, file=str(tmp_path / "bad.parquet"), spec=SPEC)


def test_simulator_rows_are_the_frame_rows_and_shards_are_its_blocks():
    src = SimulatorRows(n=BLOCK_ROWS + 5_000, seed=3, n_accounts=4)
    assert list(src.shard_bounds()) == [0, BLOCK_ROWS, BLOCK_ROWS + 5_000]
    assert clip_shards(src.shard_bounds(), 1_000, BLOCK_ROWS + 10) == [(1_000, BLOCK_ROWS), (BLOCK_ROWS, BLOCK_ROWS + 10)]
    full = AdMarketSimulator(seed=3, n_accounts=4).sample(BLOCK_ROWS + 5_000)
    pd.testing.assert_frame_equal(src.rows(BLOCK_ROWS - 50, BLOCK_ROWS + 70), full.iloc[BLOCK_ROWS - 50 : BLOCK_ROWS + 70])


def test_datamodule_streams_above_the_threshold_and_holds_bounded_slices():
    from omegaconf import OmegaConf

    feats = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "features" / "synthetic.yaml"))
    source = functools.partial(simulate, n=30_000, seed=3, n_accounts=4)
    split = {"method": "time", "val_frac": 0.1, "calib_frac": 0.1, "test_frac": 0.2}
    assert not AdDataModule(source, features=feats, split=split).streaming  # 30k rows: under the threshold
    dm = AdDataModule(source, features=feats, split=split, stream_threshold=20_000, stream_eval_rows=1_000,
                      stream_fit_rows=2_000, batch_size=512)
    dm.setup("fit")
    assert dm.streaming and dm.n_train == 18_000
    assert {k: len(v) for k, v in dm.frames.items()} == {"train": 2_000, "val": 1_000, "calib": 1_000, "test": 1_000}
    assert dm.frames["val"]["timestamp"].min() > dm.frames["train"]["timestamp"].max()  # val follows train
    batches = list(dm.train_dataloader())
    assert sum(len(b["label"]) for b in batches) == 18_000 and len(batches) == math_ceil(18_000, 512)
    with pytest.raises(ValueError, match="data.split.method=random"):
        AdDataModule(source, features=feats, split={**split, "method": "random"}, stream=True).split()
    with pytest.raises(ValueError, match="this data.source cannot stream"):
        AdDataModule(lambda: simulate(100), features=feats, stream=True).split()


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


def test_train_py_runs_with_streaming_on(tmp_path):
    env = {**os.environ, "WITHIN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    args = ["data.source.n=12000", "data.stream=true", "data.stream_eval_rows=1500", "data.stream_fit_rows=3000",
            "data.num_workers=1", "data.batch_size=512", "trainer.max_epochs=1", "model.net.hidden_dims=[32]",
            "postfit=[calibrate]", "extras.print_config=false", f"hydra.run.dir={tmp_path / 'run'}"]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    run = Path(res.stdout.strip().splitlines()[-1])
    assert (run / "bundle" / "model.safetensors").is_file()
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == math_ceil(7_200, 512)  # one step per streamed batch of the 7.2k train rows
    metrics = pd.read_json(run / "report" / "metrics.json", typ="series")
    assert np.isfinite(metrics["test/logloss"]) and metrics["train/loss"] < 0.69  # it learned the base rate
    meta = (run / "bundle" / "metadata.json").read_text()
    assert '"stream": true' in meta
