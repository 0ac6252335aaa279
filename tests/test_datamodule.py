"""AdDataModule: time-aware splits, train-only fitting, deterministic batches, DDP sharding."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from within.data.datamodule import AdDataModule, BatchIndexSampler, split_frame
from within.features.spec import FeatureSpec

SPEC = {
    "label": "clicked", "time": "ts",
    "fields": [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical"}],
}


def frame(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "ts": rng.permutation(n),  # shuffled rows: the split must sort by time
        "x": rng.normal(size=n),
        "c": [f"v{i}" for i in range(n)],  # each value appears once: test values are unseen in train
        "clicked": rng.integers(0, 2, n),
    })


def test_time_split_has_no_leakage():
    spec = FeatureSpec.from_config(SPEC)
    parts = split_frame(frame(), spec, "time", val_frac=0.1, test_frac=0.2, seed=0, calib_frac=0.1)
    assert [len(parts[k]) for k in ("train", "val", "calib", "test")] == [600, 100, 100, 200]
    assert parts["train"]["ts"].max() < parts["val"]["ts"].min()
    assert parts["val"]["ts"].max() < parts["calib"]["ts"].min() < parts["test"]["ts"].min()


def test_bad_split_fractions_are_refused():
    spec = FeatureSpec.from_config(SPEC)
    with pytest.raises(ValueError, match="data.split"):
        split_frame(frame(), spec, "time", val_frac=0.5, test_frac=0.6, seed=0)
    with pytest.raises(ValueError, match="data.split.method"):
        split_frame(frame(), spec, "chronological", val_frac=0.1, test_frac=0.2, seed=0)


def test_processor_sees_train_rows_only():
    dm = AdDataModule(source=frame, features=SPEC, split={"method": "time", "val_frac": 0.1, "test_frac": 0.2})
    dm.setup()
    assert set(dm.processor.vocabs["c"]) == set(dm.frames["train"]["c"])
    test_codes = dm.datasets["test"].tensors["cat"][:, 0]
    assert (test_codes == 1).all()  # every test value is OOV


def test_batches_are_deterministic_and_cover_the_epoch():
    dm = AdDataModule(source=frame, features=SPEC, batch_size=64, seed=3)
    dm.setup()
    first = [b["num"].clone() for b in dm.train_dataloader()]
    again = [b["num"].clone() for b in dm.train_dataloader()]
    assert all((a == b).all() for a, b in zip(first, again))
    assert sum(len(b) for b in first) == dm.n_train
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"num", "cat", "label", "weight", "mask_tabular"}


def test_sampler_shards_ranks_evenly(monkeypatch):
    sampler = BatchIndexSampler(n=103, batch_size=10, shuffle=True, seed=1)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(BatchIndexSampler, "_rank_world", lambda self, r=rank: (r, 2))
        batches = list(sampler)
        assert len(batches) == len(sampler) == 6
        seen.append(np.concatenate(batches))
    assert len(seen[0]) == len(seen[1]) == 52
    assert set(np.concatenate(seen)) == set(range(103))
    sampler.set_epoch(1)
    monkeypatch.setattr(BatchIndexSampler, "_rank_world", lambda self: (0, 1))
    assert not np.array_equal(np.concatenate(list(sampler)), np.concatenate(list(BatchIndexSampler(103, 10, True, 1))))


def test_training_batches_never_hold_a_single_row():
    """A one-row tail joins the batch before it when shuffling (BatchNorm can't normalise one row)."""
    from within.data.datamodule import BatchIndexSampler

    s = BatchIndexSampler(801, 16, shuffle=True, seed=0)
    sizes = [len(b) for b in s]
    assert len(sizes) == len(s) == 50 and sizes[-1] == 17 and sum(sizes) == 801
    assert sorted(np.concatenate(list(s))) == list(range(801))
    evaluation = [len(b) for b in BatchIndexSampler(801, 16, shuffle=False)]
    assert evaluation[-1] == 1 and len(evaluation) == 51
