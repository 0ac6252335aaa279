"""data.drop_modality: random text / image removal on the training splits, as masks the model sees."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from within.data.datamodule import AdDataModule, drop_modalities
from within.data.simulator import simulate
from within.features.spec import FeatureSpec

SPEC = {
    "label": "clicked", "time": "ts",
    "fields": [
        {"name": "x", "type": "numeric"},
        {"name": "headline", "type": "text", "max_tokens": 4},
        {"name": "body", "type": "text", "max_tokens": 4},
        {"name": "img", "type": "image", "size": 4, "channels": 3},
    ],
}


def frame(n: int = 4000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (3, 4, 4), dtype=np.uint8) for _ in range(5)]
    return pd.DataFrame({
        "ts": np.arange(n),
        "x": rng.normal(size=n),
        "headline": [f"word{i % 7} other{i % 3}" for i in range(n)],
        "body": [f"text{i % 11}" for i in range(n)],
        "img": [pics[i % 5] for i in range(n)],
        "clicked": rng.integers(0, 2, n),
    })


def test_drop_rates_masks_and_untouched_test_split():
    dm = AdDataModule(frame(), features=SPEC, split={"method": "time", "val_frac": 0.1, "test_frac": 0.2},
                      seed=3, drop_modality={"text": 0.3, "image": 0.5})
    dm.setup("fit")
    train = dm.datasets["train"].full()
    n = len(train["mask_text"])
    text_rate = 1 - train["mask_text"].float().mean().item()
    image_rate = 1 - train["mask_image"].float().mean().item()
    assert abs(text_rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    assert abs(image_rate - 0.5) < 4 * np.sqrt(0.25 / n)
    # both text fields go together: a row has text or has none
    fr = dm.frames["train"]
    assert ((fr["headline"] == "") == (fr["body"] == "")).all()
    assert (fr["img"].isna().to_numpy() == ~train["mask_image"].numpy()).all()
    # independent draws: about 0.3 * 0.5 of rows lose both
    both = (~train["mask_text"] & ~train["mask_image"]).float().mean().item()
    assert abs(both - 0.15) < 0.05
    assert dm.datasets["val"].full()["mask_text"].float().mean() < 0.85  # val is dropped too
    test = dm.datasets["test"].full()
    assert test["mask_text"].all() and test["mask_image"].all()  # test stays whole


def test_drop_is_seeded_and_does_not_touch_the_input():
    spec = FeatureSpec.from_config(SPEC)
    frames = {"train": frame(500), "test": frame(100)}
    a = drop_modalities(frames, spec, {"image": 0.4}, seed=1)
    b = drop_modalities(frames, spec, {"image": 0.4}, seed=1)
    c = drop_modalities(frames, spec, {"image": 0.4}, seed=2)
    assert (a["train"]["img"].isna() == b["train"]["img"].isna()).all()
    assert not (a["train"]["img"].isna() == c["train"]["img"].isna()).all()
    assert frames["train"]["img"].notna().all() and a["test"] is frames["test"]
    assert (a["train"]["headline"] != "").all()  # text rate 0: kept


@pytest.mark.parametrize("rates, match", [
    ({"audio": 0.3}, "unknown modalities"),
    ({"text": 1.5}, "rate in"),
])
def test_bad_drop_settings_name_the_key(rates, match):
    with pytest.raises(ValueError, match=rf"data\.drop_modality.*{match}"):
        drop_modalities({"train": frame(50)}, FeatureSpec.from_config(SPEC), rates, seed=0)


def test_drop_needs_the_modality_in_the_spec():
    spec = FeatureSpec.from_config({"label": "clicked", "fields": [{"name": "x", "type": "numeric"}]})
    with pytest.raises(ValueError, match="no image field"):
        drop_modalities({"train": frame(50)}, spec, {"image": 0.3}, seed=0)


def test_model_trained_with_dropped_modalities_predicts_partial_records(tmp_path):
    """A short pipeline run with data.drop_modality: the bundle serves records without text / image."""
    from tests.conftest import FAST, compose_cfg
    from within import AdScorePredictor
    from within.pipeline.train import run_train

    cfg = compose_cfg("train", FAST + ["data.source.n=3000", "model.net.attention_dim=8",
        "postfit=[calibrate,export]", "export.onnx=false", "logger=none", "~callbacks.lr_monitor",
        "+data.drop_modality={text:0.3,image:0.3}",
    ], out_dir=tmp_path)
    run_train(cfg)
    pred = AdScorePredictor.load(tmp_path / "bundle")
    rows = simulate(n=50, seed=7)
    rows["headline"] = ""
    rows["description"] = ""
    rows["main_image"] = None
    p = np.asarray(pred.predict(rows))
    assert p.shape == (50,) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
