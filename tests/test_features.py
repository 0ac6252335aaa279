"""FeatureSpec validation and FeatureProcessor behaviour."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from within.features.processor import OOV, FeatureProcessor
from within.features.spec import FeatureError, FeatureSpec

SPEC = {
    "label": "clicked",
    "time": "ts",
    "fields": [
        {"name": "budget", "type": "numeric", "transform": "log1p"},
        {"name": "score", "type": "numeric", "required": False},
        {"name": "device", "type": "categorical"},
        {"name": "account", "type": "group", "level": "account"},
        {"name": "headline", "type": "text", "max_tokens": 6, "required": False},
        {"name": "img", "type": "image", "size": 4, "channels": 3, "required": False},
    ],
}


def frame(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pic = np.full((3, 4, 4), 7, dtype=np.uint8)
    return pd.DataFrame({
        "ts": np.arange(n),
        "budget": rng.uniform(10, 1000, n),
        "score": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
        "device": rng.choice(["mobile", "desktop"], n),
        "account": rng.choice(["a1", "a2", "a3"], n),
        "headline": rng.choice(["big sale today", "new shoes", None], n),
        "img": [pic if i % 3 else None for i in range(n)],
        "clicked": rng.integers(0, 2, n),
    })


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec.from_config(SPEC)


def test_transform_shapes_and_masks(spec):
    df = frame()
    arrays = FeatureProcessor(spec).fit(df).transform(df, with_label=True)
    n = len(df)
    assert arrays["num"].shape == (n, 3)  # budget, score, score__missing
    assert arrays["cat"].shape == (n, 2) and arrays["groups"].shape == (n, 1)
    assert arrays["text"].shape == (n, 1, 6)
    assert arrays["image"].shape == (n, 1, 3, 4, 4) and arrays["image"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["mask_text"], df["headline"].notna().to_numpy())
    np.testing.assert_array_equal(arrays["mask_image"], df["img"].notna().to_numpy())
    assert np.isfinite(arrays["num"]).all()
    assert (arrays["text"][~arrays["mask_text"]] == 0).all()


def test_vocab_is_fit_on_train_only_and_unknown_maps_to_oov(spec):
    train = frame()
    proc = FeatureProcessor(spec).fit(train)
    test = frame(5, seed=1).assign(device=["tablet"] * 5)
    arrays = proc.transform(test)
    assert "tablet" not in proc.vocabs["device"]
    assert (arrays["cat"][:, 0] == OOV).all()


def test_json_round_trip_gives_identical_arrays(spec, tmp_path):
    df = frame()
    proc = FeatureProcessor(spec).fit(df)
    proc.save(tmp_path / "spec.json")
    again = FeatureProcessor.load(tmp_path / "spec.json")
    a, b = proc.transform(df), again.transform(df)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_dedupe_images_shares_one_copy(spec):
    df = frame(30)
    arrays = FeatureProcessor(spec).fit(df).transform(df, dedupe_images=True)
    assert arrays["image_table"].shape[0] == 2  # the one picture + blank
    full = FeatureProcessor(spec).fit(df).transform(df)["image"]
    np.testing.assert_array_equal(arrays["image_table"][arrays["image_index"]], full)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.drop(columns=["budget"]), "field 'budget': required but missing"),
        (lambda d: d.assign(budget=d["budget"].astype(object).where(d.index != 3, "abc")), "field 'budget': expected numbers, got str 'abc' at row 3"),
        (lambda d: d.assign(budget=d["budget"].where(d.index != 4, np.nan)), "field 'budget': nan at row 4"),
        (lambda d: d.iloc[:0], "empty DataFrame"),
        (lambda d: d.assign(device=d["device"].where(d.index != 2, None)), "field 'device': missing value at row 2"),
        (lambda d: d.assign(headline=d["headline"].astype(object).where(d.index != 1, 5)), "field 'headline': expected text"),
    ],
)
def test_bad_input_names_the_field(spec, mutate, message):
    df = frame()
    proc = FeatureProcessor(spec).fit(df)
    with pytest.raises(FeatureError) as err:
        proc.transform(mutate(df))
    assert message in str(err.value)


def test_bad_image_shape_names_field_and_row(spec):
    df = frame()
    proc = FeatureProcessor(spec).fit(df)
    bad = df.copy()
    bad.at[1, "img"] = np.zeros((3, 5, 5), dtype=np.uint8)
    with pytest.raises(FeatureError, match=r"field 'img': row 1: image shape \(3, 5, 5\)"):
        proc.transform(bad)


def test_records_dict_and_list_are_accepted(spec):
    df = frame()
    proc = FeatureProcessor(spec).fit(df)
    rec = df.drop(columns=["clicked"]).iloc[0].to_dict()
    one = proc.transform(rec)
    many = proc.transform([rec, rec])
    assert one["num"].shape == (1, 3) and many["num"].shape == (2, 3)
    np.testing.assert_allclose(one["num"][0], many["num"][1])


def test_spec_rejects_unknown_option_with_suggestion():
    bad = {"fields": [{"name": "x", "type": "numeric", "transfrom": "log1p"}]}
    with pytest.raises(FeatureError, match=r"unknown option 'transfrom'; did you mean 'transform'"):
        FeatureSpec.from_config(bad)
    with pytest.raises(FeatureError, match=r"type 'numerc' is not one of"):
        FeatureSpec.from_config({"fields": [{"name": "x", "type": "numerc"}]})


def test_aggregated_labels_are_checked():
    spec = FeatureSpec.from_config({"label": "clicks", "weight": "impressions",
                                    "fields": [{"name": "x", "type": "numeric"}]})
    df = pd.DataFrame({"x": [1.0, 2.0], "clicks": [1, 5], "impressions": [10, 3]})
    with pytest.raises(FeatureError, match=r"row 1 has 5.0 clicks for 3.0 impressions"):
        spec.validate_frame(df, require_label=True)


def test_image_augment_flag_reaches_input_dim(spec):
    df = frame()
    assert FeatureProcessor(spec).fit(df).input_dim["image_augment"] is False
    cfg = {**SPEC, "fields": [dict(f, augment=True) if f["type"] == "image" else f for f in SPEC["fields"]]}
    assert FeatureProcessor(FeatureSpec.from_config(cfg)).fit(df).input_dim["image_augment"] is True
