"""benchmarks/ctr_throughput.py on tiny streams: shapes, the arms, the ratios it reports."""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks import ctr_throughput as ct
from benchmarks.common import compose


def test_streams_have_the_promised_shapes_and_are_seeded():
    df, spec = ct.make_shape("ipinyou", 4000, seed=1)
    cats = [f for f in spec["fields"] if f["type"] == "categorical"]
    assert len(cats) == 16 and sum(ct.IPINYOU.values()) in range(125_000, 135_000)
    assert all(df[n].max() < ct.IPINYOU[n] for n in ct.IPINYOU)
    assert 0.02 < df["clicked"].mean() < 0.07
    again, _ = ct.make_shape("ipinyou", 4000, seed=1)
    assert df.equals(again)
    crit, cspec = ct.make_shape("criteo", 3000)
    kinds = [f["type"] for f in cspec["fields"]]
    assert kinds.count("numeric") == 13 and kinds.count("categorical") == 26
    assert (crit[[f"I{j}" for j in range(1, 14)]] >= 0).all().all()


def test_one_tiny_run_times_every_arm_and_scores_the_held_out_rows():
    args = argparse.Namespace(rows=3000, test_rows=1000, repeats=2, seed=0)
    arms = ["within", "plain"] + (["deepfm"] if ct.have_deepctr() else [])
    cfg = compose(["model.net.sparse_embeddings=true", "model.net.hidden_dims=[32]"])
    out = ct.run_shape("criteo", args, cfg, arms)
    assert out["train_rows"] == 3000 and out["test_rows"] == 1000
    for arm in arms:
        assert out[arm]["samples_per_s"] > 0 and 0.0 <= out[arm]["test_auc"] <= 1.0
    # a ratio pairs each repeat's adjacent epochs, then takes the median over repeats
    paired = [w / p for w, p in zip(out["within"]["runs"], out["plain"]["runs"])]
    assert len(paired) == 2 and out["within_vs_plain_runs"] == paired
    assert np.isclose(out["within_vs_plain"], np.median(paired))
    # the same network, weights and batches: within and the plain loop learn the same function
    assert abs(out["within"]["test_auc"] - out["plain"]["test_auc"]) < 0.05
