"""RecordEncoder: the same arrays as FeatureProcessor.transform, from records, with no DataFrame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from within.features.processor import FeatureProcessor
from within.features.records import RecordEncoder
from within.features.spec import FeatureError, FeatureSpec

SPEC = {
    "label": "clicked",
    "fields": [
        {"name": "budget", "type": "numeric", "transform": "log1p"},
        {"name": "bid", "type": "numeric", "transform": "signed_log1p", "required": False},
        {"name": "lat", "type": "numeric", "required": False},
        {"name": "placement", "type": "categorical"},
        {"name": "hour", "type": "categorical", "required": False},
        {"name": "device", "type": "categorical", "required": False, "min_count": 2},
        {"name": "city", "type": "group", "level": "city"},
        {"name": "campaign", "type": "group", "level": "campaign", "embed": False},
        {"name": "headline", "type": "text", "max_tokens": 4},
        {"name": "description", "type": "text", "max_tokens": 6, "required": False},
        {"name": "main_image", "type": "image", "size": 4, "channels": 3, "required": False},
    ],
}
PLACEMENTS = ["feed", "search", "video"]
DEVICES = ["mobile", "desktop", "tablet", "tv"]
CITIES = ["Oslo", "Lima", "Pune"]
WORDS = ["shop", "now", "deal", "free", "new", "zap", "Best", "it's"]


def _train_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hour = rng.integers(0, 24, n).astype(float)
    hour[rng.random(n) < 0.1] = np.nan  # "<NA>" becomes a category of `hour`
    device = np.array([DEVICES[i] for i in rng.integers(0, 3, n)], dtype=object)
    device[rng.random(n) < 0.1] = None
    bid = rng.normal(1.0, 2.0, n)
    bid[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({
        "budget": rng.uniform(10, 1000, n),
        "bid": bid,
        "lat": rng.normal(40, 10, n),
        "placement": rng.choice(PLACEMENTS, n),
        "hour": hour,
        "device": device,
        "city": rng.choice(CITIES, n),
        "campaign": rng.integers(100, 110, n),
        "headline": [" ".join(rng.choice(WORDS, 3)) for _ in range(n)],
        "description": [" ".join(rng.choice(WORDS, 5)) for _ in range(n)],
        "main_image": [rng.integers(0, 256, (3, 4, 4), dtype=np.uint8) for _ in range(n)],
        "clicked": rng.integers(0, 2, n),
    })


@pytest.fixture(scope="module")
def processor() -> FeatureProcessor:
    return FeatureProcessor(FeatureSpec.from_config(SPEC)).fit(_train_frame())


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for key, want in a.items():
        assert want.dtype == b[key].dtype, key
        assert want.shape == b[key].shape, key
        np.testing.assert_array_equal(want, b[key], err_msg=key)


# ---- random records ---------------------------------------------------------------------
finite = st.floats(-1e6, 1e6, allow_nan=False)
special = st.sampled_from([float("nan"), float("inf"), float("-inf")])
text = st.lists(st.sampled_from(WORDS + ["unseen", "Zap!", "  "]), max_size=8).map(" ".join)


@st.composite
def batches(draw) -> list[dict]:
    n = draw(st.integers(1, 6))
    # one value kind per categorical column, as real batches have (see RecordEncoder's docstring)
    hour_kind = draw(st.sampled_from(["int", "float", "str"]))
    hour_values = {
        "int": st.integers(-2, 30),
        "float": st.integers(-2, 30).map(float) | st.just(float("nan")),
        "str": st.integers(0, 30).map(str) | st.sampled_from(["<NA>", "x"]),
    }[hour_kind]
    image = (st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).integers(0, 256, (3, 4, 4), dtype=np.uint8))
             | st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).random((3, 4, 4))))
    records = []
    for _ in range(n):
        r = {
            "budget": draw(finite | st.integers(-5, 10**6)),
            "placement": draw(st.sampled_from(PLACEMENTS + ["unseen"])),
            "city": draw(st.sampled_from(CITIES + ["Nowhere"]) | st.integers(0, 3)),
            "campaign": draw(st.integers(98, 112)),
            "headline": draw(text),
        }
        optional = {
            "bid": finite | special,
            "lat": finite | special | st.integers(-90, 90),
            "hour": hour_values,
            "device": st.sampled_from(DEVICES + ["unseen"]) | st.none(),
            "description": text | st.none() | st.just(float("nan")),
            "main_image": image | st.none(),
        }
        for name, values in optional.items():
            if draw(st.booleans()) or not records:  # the first record has every key (see the all-absent test)
                r[name] = draw(values)
        records.append(r)
    return records


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=batches())
def test_records_match_processor_transform(processor, records):
    enc = RecordEncoder(processor)
    want = processor.transform(records)
    _same(want, enc.encode(records))
    columns = {name: [r.get(name) for r in records] for name in processor.spec.names}
    _same(want, enc.encode_columns(columns))
    _same(want, enc.encode(pd.DataFrame(records)))
    if len(records) > 1:  # a row's arrays do not depend on the rest of the batch
        alone = enc.encode(records[-1])
        _same({k: v[-1:] for k, v in want.items()}, alone)


def test_single_dict_and_simulator_like_frame(processor):
    df = _train_frame(50, seed=3).drop(columns=["clicked"])
    enc = RecordEncoder(processor)
    _same(processor.transform(df), enc.encode(df))
    _same(processor.transform(df.iloc[0].to_dict()), enc.encode(df.iloc[0].to_dict()))


def test_missing_optional_field_reads_as_the_trained_missing_category(processor):
    """An optional field absent from every record is "<NA>" (what training saw), alone or in a batch;
    the DataFrame path gives OOV there, but "<NA>" when another row of the batch has the field."""
    enc = RecordEncoder(processor)
    base = {"budget": 5.0, "placement": "feed", "city": "Oslo", "campaign": 101, "headline": "shop now"}
    na = processor._index["hour"]["<NA>"]
    hour_col = [f.name for f in processor.spec.categorical].index("hour")
    assert enc.encode(base)["cat"][0, hour_col] == na
    pair = processor.transform([dict(base, hour=3), base])["cat"][:, hour_col]
    assert pair[1] == na and enc.encode([dict(base, hour=3), base])["cat"][1, hour_col] == na


def test_none_for_an_optional_numeric_is_missing(processor):
    enc = RecordEncoder(processor)
    base = {"budget": 5.0, "placement": "feed", "city": "Oslo", "campaign": 101, "headline": "shop now"}
    _same(enc.encode(dict(base, bid=float("nan"))), enc.encode(dict(base, bid=None)))


# ---- bad input: FeatureError naming the field ----------------------------------------------
GOOD = {"budget": 5.0, "placement": "feed", "city": "Oslo", "campaign": 101, "headline": "shop now"}


@pytest.mark.parametrize("record, message", [
    ({k: v for k, v in GOOD.items() if k != "budget"}, "field 'budget': required but missing"),
    (dict(GOOD, budget="cheap"), "field 'budget': expected a number, got str 'cheap'"),
    (dict(GOOD, budget=None), "field 'budget': missing in the record; it is required"),
    (dict(GOOD, budget=float("inf")), "field 'budget': inf in the record is not a finite number"),
    (dict(GOOD, bid=[1, 2]), "field 'bid': expected a number, got list"),
    (dict(GOOD, placement=None), "field 'placement': missing value in the record; it is required"),
    (dict(GOOD, placement={"a": 1}), "field 'placement': expected a category (str or int), got dict"),
    (dict(GOOD, city=[1]), "field 'city': expected a category (str or int), got list"),
    (dict(GOOD, headline=7), "field 'headline': expected text (str), got int 7"),
    (dict(GOOD, headline=None), "field 'headline': missing value in the record; it is required"),
    (dict(GOOD, main_image=np.zeros((3, 5, 5), np.uint8)), "field 'main_image': row 0: image shape (3, 5, 5)"),
    (dict(GOOD, main_image=np.full((3, 4, 4), 2.0)), "field 'main_image': row 0: image must be uint8"),
])
def test_bad_record_names_the_field(processor, record, message):
    with pytest.raises(FeatureError) as err:
        RecordEncoder(processor).encode(record)
    assert message in str(err.value)


def test_bad_batches_name_the_record_or_field(processor):
    enc = RecordEncoder(processor)
    with pytest.raises(FeatureError, match="field 'budget': expected a number, got str 'x' in record 1"):
        enc.encode([GOOD, dict(GOOD, budget="x")])
    with pytest.raises(FeatureError, match="input: record 1 is a list, expected a dict"):
        enc.encode([GOOD, [1, 2]])
    with pytest.raises(FeatureError, match="input: empty list of records"):
        enc.encode([])
    with pytest.raises(FeatureError, match="input: expected a record dict"):
        enc.encode("budget=5")
    with pytest.raises(FeatureError, match="field 'placement': 1 values, but other fields have 2"):
        enc.encode_columns({"budget": [1.0, 2.0], "placement": ["feed"]})
    with pytest.raises(FeatureError, match="field 'budget': a columnar batch needs a sequence"):
        enc.encode_columns({"budget": 5.0})


def test_unfitted_processor_is_refused():
    with pytest.raises(FeatureError, match="not fitted"):
        RecordEncoder(FeatureProcessor(FeatureSpec.from_config(SPEC)))
