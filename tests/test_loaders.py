"""Real-data loaders: shapes and label rates against an independent plain-Python read, spec coverage,
the csv loader's row/column errors, missing-file and download (file:// URL, checksum) behaviour."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from within.data.loaders import LOADERS, _common, advertising, criteo, csv_file, ipinyou, kag_conversion
from within.features.spec import FIELD_TYPES, FeatureSpec

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("WITHIN_DATA_DIR") or REPO.parent / "shared" / "data")
CONF = REPO / "conf"

FOLDERS = {
    "ipinyou": "ipinyou_deepctr_sample",
    "criteo": "criteo_avazu_kaggle_head10k",
    "avazu": "criteo_avazu_kaggle_head10k",
    "advertising": "advertising_clicked_on_ad",
    "kag_conversion": "facebook_ad_conversions_KAG",
}
# Documented in each PROVENANCE.md; the tests also recount them from the raw files.
SHAPES = {
    "ipinyou": (26_773, 17),
    "criteo": (8_000, 40),
    "avazu": (8_999, 25),
    "advertising": (1_000, 10),
    "kag_conversion": (1_143, 11),
}
_FRAMES: dict[str, pd.DataFrame] = {}


def data_root(name: str) -> Path:
    root = DATA_DIR / FOLDERS[name]
    if not root.is_dir():
        pytest.skip(f"{root} absent (set WITHIN_DATA_DIR)")
    return root


def frame(name: str) -> pd.DataFrame:
    if name not in _FRAMES:
        _FRAMES[name] = LOADERS[name](data_root(name))
    return _FRAMES[name]


def spec_of(name: str) -> FeatureSpec:
    return FeatureSpec.from_config(OmegaConf.load(CONF / "features" / f"{name}.yaml"))


# ---- independent counts: (rows, positives, weight total or None) --------------------------------
def raw_counts(name: str) -> tuple[int, int, int | None]:
    root = data_root(name)
    if name == "ipinyou":
        lines = (root / "train.fm.txt").read_text().splitlines()
        return len(lines), sum(line.split(" ", 1)[0] == "1" for line in lines), None
    if name == "criteo":
        lines = (root / "criteo_train_8000.txt").read_text().splitlines()
        return len(lines), sum(line.split("\t", 1)[0] == "1" for line in lines), None
    if name == "avazu":
        with open(root / "avazu_train_8999.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return len(rows), sum(r["click"] == "1" for r in rows), None
    if name == "advertising":
        with open(root / "advertising.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return len(rows), sum(r["Clicked on Ad"] == "1" for r in rows), None
    with open(root / "KAG_conversion_data.csv", newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    return len(rows), sum(int(r["Clicks"]) for r in rows), sum(int(r["Impressions"]) for r in rows)


@pytest.mark.data
@pytest.mark.parametrize("name", list(FOLDERS))
def test_shape_and_label_rate_match_raw_file(name):
    df = frame(name)
    n, pos, impressions = raw_counts(name)
    assert df.shape == SHAPES[name]
    assert len(df) == n
    assert int(df["clicked"].sum()) == pos
    if impressions is None:
        assert set(np.unique(df["clicked"])) == {0, 1}
        assert df["clicked"].mean() == pytest.approx(pos / n)
    else:  # aggregated: CTR = clicks / impressions
        assert int(df["impressions"].sum()) == impressions
        assert df["clicked"].sum() / df["impressions"].sum() == pytest.approx(pos / impressions)


def _compatible(series: pd.Series, ftype: str) -> bool:
    if ftype == "numeric":
        return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    values = series.dropna()
    return (pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series)) and all(
        isinstance(v, str) for v in values.iloc[:: max(1, len(values) // 500)]
    )


@pytest.mark.data
@pytest.mark.parametrize("name", list(FOLDERS))
def test_frame_matches_its_feature_spec(name):
    df, spec = frame(name), spec_of(name)
    for f in spec.fields:
        assert f.name in df.columns, f"{name}: spec field {f.name} missing from frame"
        assert _compatible(df[f.name], f.type), f"{name}.{f.name}: dtype {df[f.name].dtype} vs {f.type}"
        if f.required:
            assert df[f.name].notna().all(), f"{name}.{f.name} is required but has NaN"
    assert pd.api.types.is_integer_dtype(df[spec.label])
    if spec.weight:
        assert pd.api.types.is_integer_dtype(df[spec.weight])
    if spec.time:
        assert pd.api.types.is_datetime64_any_dtype(df[spec.time])
    assert spec.truth is None
    spec.validate_frame(df, require_label=True)


@pytest.mark.data
def test_ipinyou_decodes_like_a_plain_python_read_and_fast():
    root = data_root("ipinyou")
    start = time.perf_counter()
    df = ipinyou.load(root)
    assert time.perf_counter() - start < 3.0
    lookup = {}
    for line in (root / "featindex.fm.txt").read_text().splitlines():
        key, idx = line.split("\t")
        field, value = key.split(":", 1)
        lookup[int(idx)] = (field, value)
    lines = (root / "train.fm.txt").read_text().splitlines()
    assert list(df.columns[:16]) == list(dict.fromkeys(f for _, (f, _) in sorted(lookup.items())))
    for r in [0, 1, 2, 777, 12_345, len(lines) - 1]:
        tokens = lines[r].split()
        expected = dict(lookup[int(t.split(":")[0])] for t in tokens[1:])
        assert df.iloc[r, :16].to_dict() == expected
        assert df["clicked"].iloc[r] == int(tokens[0])
    assert (df["adexchange"] == "null").all()  # the literal category "null", not a missing value


@pytest.mark.data
def test_criteo_keeps_missing_as_nan():
    root = data_root("criteo")
    cells = [line.split("\t") for line in (root / "criteo_train_8000.txt").read_text().splitlines()]
    df = frame("criteo")
    assert int(df["I12"].isna().sum()) == sum(c[12] == "" for c in cells)
    assert int(df["C22"].isna().sum()) == sum(c[14 + 21] == "" for c in cells)
    assert df["I2"].min() < 0  # signed counts: the spec's signed_log1p is needed


@pytest.mark.data
def test_avazu_hour_becomes_timestamp():
    df = frame("avazu")
    assert (df["timestamp"] == pd.Timestamp("2014-10-21 00:00")).all()
    assert set(df["hour_of_day"]) == {"00"} and set(df["weekday"]) == {"Tuesday"}
    assert "id" not in df.columns


# ---- kag_conversion: impossible aggregated rows ---------------------------------------------------
KAG_HEADER = (
    "ad_id,xyz_campaign_id,fb_campaign_id,age,gender,interest,Impressions,Clicks,Spent,"
    "Total_Conversion,Approved_Conversion"
)


def test_kag_drops_impossible_rows_with_warning(tmp_path, caplog):
    rows = [
        "1,916,10,30-34,M,15,100,3,1.5,1,0",
        "2,916,10,30-34,F,16,0,0,0,1,0",  # zero impressions
        "3,936,11,35-39,M,20,50,60,2.0,0,0",  # more clicks than impressions
        "4,936,11,35-39,F,21,80,0,0,0,0",
    ]
    (tmp_path / "KAG_conversion_data.csv").write_bytes(
        ("\ufeff" + "\r\n".join([KAG_HEADER, *rows]) + "\r\n").encode("utf-8")
    )
    with caplog.at_level(logging.WARNING):
        df = kag_conversion.load(tmp_path)
    assert df["ad_id"].tolist() == ["1", "4"]
    assert "dropping 2 of 4 rows" in caplog.text and "[3, 4]" in caplog.text


def test_kag_bad_count_names_line_and_column(tmp_path):
    (tmp_path / "KAG_conversion_data.csv").write_text(KAG_HEADER + "\n1,916,10,30-34,M,15,100,x,1.5,1,0\n")
    with pytest.raises(ValueError, match=r"line 2, column 'Clicks': expected a whole number, got 'x'"):
        kag_conversion.load(tmp_path)


# ---- missing files and download -----------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in LOADERS if n != "csv"])
def test_missing_root_names_path_and_fixes(name, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LOADERS[name](tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "download=true" in msg and "paths.data_dir=" in msg


def _serve(tmp_path: Path, name: str, payload: bytes) -> str:
    src = tmp_path / "remote" / name
    src.parent.mkdir()
    src.write_bytes(payload)
    return src.as_uri()


def test_download_verifies_checksum_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("WITHIN_CACHE_DIR", str(tmp_path / "cache"))
    rows = [["0", "1", "", "3", *[""] * 10, *["ab"] * 26], ["1", "2", "-1", *[""] * 11, *["cd"] * 26]]
    payload = "".join("\t".join(r) + "\n" for r in rows).encode()
    url = _serve(tmp_path, "train", payload)
    good = _common.RemoteFile("criteo_train_8000.txt", url, hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(criteo, "FILES", (good,))
    df = criteo.load(tmp_path / "absent", download=True)
    assert df.shape == (2, 40) and df["clicked"].tolist() == [0, 1] and np.isnan(df["I2"].iloc[0])
    assert (tmp_path / "cache" / "criteo" / "criteo_train_8000.txt").read_bytes() == payload

    monkeypatch.setenv("WITHIN_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setattr(criteo, "FILES", (_common.RemoteFile(good.name, url, "0" * 64),))
    with pytest.raises(OSError, match="checksum mismatch"):
        criteo.load(None, download=True)
    assert not (tmp_path / "cache2" / "criteo" / good.name).exists()


def test_advertising_download_drops_leading_blank_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WITHIN_CACHE_DIR", str(tmp_path / "cache"))
    text = (
        b"Daily Time Spent on Site,Age,Area Income,Daily Internet Usage,Ad Topic Line,City,Male,Country,"
        b"Timestamp,Clicked on Ad\n68.95,35,61833.9,256.09,Cloned orchestration,Wrightburgh,0,Tunisia,"
        b"2016-03-27 00:53:11,1\n"
    )
    url = _serve(tmp_path, "advertising.csv", b"\n" + text)
    remote = _common.RemoteFile(
        "advertising.csv", url, hashlib.sha256(text).hexdigest(), fix=advertising.FILES[0].fix
    )
    monkeypatch.setattr(advertising, "FILES", (remote,))
    df = advertising.load(None, download=True)
    assert df["clicked"].tolist() == [1] and df["timestamp"].iloc[0] == pd.Timestamp("2016-03-27 00:53:11")


# ---- your own CSV ---------------------------------------------------------------------------------
EXAMPLE_SPEC = CONF / "features" / "csv.yaml"
CSV_HEADER = ["campaign_id", "headline", "budget", "bid", "placement", "device", "date", "Clicked", "notes"]


def write_example_csv(path: Path, n: int = 40, seed: int = 0, edit=None) -> Path:
    """A small CSV in the csv.yaml format; `edit(rows)` may break rows before writing."""
    rng = np.random.default_rng(seed)
    rows = [CSV_HEADER]
    for i in range(n):
        rows.append(
            [
                f"c{i % 4}",
                f"great offer number {i}",
                f"{rng.uniform(10, 900):.2f}",
                "" if i % 7 == 0 else f"{rng.uniform(0.1, 3):.3f}",
                rng.choice(["feed", "search"]),
                "" if i % 5 == 0 else rng.choice(["mobile", "desktop"]),
                f"2024-05-{1 + i % 28:02d}",
                str(int(rng.random() < 0.3)),
                "free text, ignored",
            ]
        )
    if edit:
        edit(rows)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_csv_loads_valid_file(tmp_path):
    path = write_example_csv(tmp_path / "ads.csv")
    df = csv_file.load(tmp_path, file="ads.csv", spec=EXAMPLE_SPEC, label="Clicked")
    spec = spec_of("csv")
    assert list(df.columns) == [*spec.names, "clicked", "date"]  # unlisted column `notes` is dropped
    assert len(df) == 40
    with open(path, newline="") as fh:
        assert int(df["clicked"].sum()) == sum(r["Clicked"] == "1" for r in csv.DictReader(fh))
    assert df["bid"].isna().sum() == 6 and df["device"].isna().sum() == 8  # optional empties kept missing
    assert pd.api.types.is_datetime64_any_dtype(df["date"])
    for f in spec.fields:
        assert _compatible(df[f.name], f.type)


def test_csv_wrong_type_names_row_and_column(tmp_path):
    def bad_budget(rows):
        rows[17][2] = "abc"

    write_example_csv(tmp_path / "ads.csv", edit=bad_budget)
    with pytest.raises(
        ValueError, match=r"row 17 \(line 18\), column 'budget': expected a number, got 'abc'"
    ):
        csv_file.load(tmp_path, file="ads.csv", spec=EXAMPLE_SPEC, label="Clicked")


@pytest.mark.parametrize("extra", [True, False])
def test_csv_malformed_row_names_row(tmp_path, extra):
    def break_row(rows):
        rows[17] = rows[17] + ["surplus"] if extra else rows[17][:-2]

    write_example_csv(tmp_path / "ads.csv", edit=break_row)
    n = 10 if extra else 7
    with pytest.raises(ValueError, match=rf"row 17 \(line 18\): expected 9 fields like the header, got {n}"):
        csv_file.load(tmp_path, file="ads.csv", spec=EXAMPLE_SPEC, label="Clicked")


@pytest.mark.parametrize(
    ("col", "value", "message"),
    [
        (4, "", r"row 9 \(line 10\), column 'placement': empty cell in a required column"),
        (7, "2", r"row 9 \(line 10\), column 'clicked': expected 0 or 1, got '2'"),
        (6, "soon", r"row 9 \(line 10\), column 'date': expected an ISO date"),
    ],
)
def test_csv_bad_cell_names_row_and_column(tmp_path, col, value, message):
    def edit(rows):
        rows[9][col] = value

    write_example_csv(tmp_path / "ads.csv", edit=edit)
    with pytest.raises(ValueError, match=message):
        csv_file.load(tmp_path, file="ads.csv", spec=EXAMPLE_SPEC, label="Clicked")


def test_csv_missing_column_and_missing_file(tmp_path):
    write_example_csv(tmp_path / "ads.csv")
    with pytest.raises(ValueError, match=r"column 'clicked' is in the spec but not in the header"):
        csv_file.load(tmp_path, file="ads.csv", spec=EXAMPLE_SPEC)  # label column not renamed
    with pytest.raises(FileNotFoundError, match=r"other\.csv.*paths\.data_dir="):
        csv_file.load(tmp_path, file="other.csv", spec=EXAMPLE_SPEC)


def test_csv_without_file_or_spec_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match=r"set data\.source\.file="):
        csv_file.load(tmp_path, spec=EXAMPLE_SPEC)
    with pytest.raises(ValueError, match=r"no features spec given"):
        csv_file.load(tmp_path, file="ads.csv")


def test_csv_aggregated_rows_check_clicks_against_impressions(tmp_path):
    spec = {
        "label": "clicks",
        "weight": "impressions",
        "time": None,
        "fields": [{"name": "ad", "type": "group", "level": "ad"}],
    }
    (tmp_path / "agg.csv").write_text("ad,impressions,clicks\na,100,3\nb,50,7\n")
    df = csv_file.load(tmp_path, file="agg.csv", spec=spec)
    assert df["clicks"].tolist() == [3, 7] and df["impressions"].tolist() == [100, 50]
    (tmp_path / "agg.csv").write_text("ad,impressions,clicks\na,100,3\nb,5,7\n")
    with pytest.raises(
        ValueError,
        match=r"row 2 \(line 3\), column 'clicks': clicks must be a whole number in \[0, impressions=5\]",
    ):
        csv_file.load(tmp_path, file="agg.csv", spec=spec)


# ---- configs --------------------------------------------------------------------------------------
MY_FEATURES = ["ipinyou", "criteo", "avazu", "advertising", "kag_conversion", "csv"]


@pytest.mark.parametrize("name", MY_FEATURES)
def test_feature_yaml_parses_with_allowed_types(name):
    path = CONF / "features" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == "# @package features"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    types = {f["type"] for f in cfg["fields"]}
    assert types <= set(FIELD_TYPES) == {"numeric", "categorical", "text", "image", "group"}
    assert cfg["label"] == "clicked" and cfg["truth"] is None
    spec = FeatureSpec.from_config(cfg)
    levels = [f.level for f in spec.groups]
    assert all(levels) and len(set(levels)) == len(levels)


@pytest.mark.data
@pytest.mark.parametrize("name", list(FOLDERS))
def test_data_yaml_source_instantiates(name):
    from hydra.utils import instantiate

    data_root(name)
    path = CONF / "data" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == "# @package data"
    cfg = OmegaConf.create({"paths": {"data_dir": str(DATA_DIR)}, "data": OmegaConf.load(path)})
    assert cfg.data.split.method in ("time", "random")
    assert (cfg.data.split.method == "time") == (name in ("criteo", "avazu", "advertising"))
    df = instantiate(cfg.data.source)()
    assert df.shape == SHAPES[name]


def test_csv_data_yaml_reads_spec_from_features(tmp_path):
    from hydra.utils import instantiate

    write_example_csv(tmp_path / "ads.csv")
    cfg = OmegaConf.create(
        {
            "data": OmegaConf.load(CONF / "data" / "csv.yaml"),
            "features": OmegaConf.load(EXAMPLE_SPEC),
        }
    )
    cfg.data.source.file = str(tmp_path / "ads.csv")
    cfg.data.source.label = "Clicked"
    df = instantiate(cfg.data.source)()
    assert len(df) == 40 and "clicked" in df


def test_registry_names_match_data_configs():
    # every data config but the simulator's reads through a registered loader, and no loader lacks a config
    configs = {p.stem for p in (CONF / "data").glob("*.yaml")} - {"synthetic"}
    assert set(LOADERS) == configs and {"ipinyou", "criteo", "avazu", "kag_conversion", "telco", "csv"} <= configs
    for name, fn in LOADERS.items():
        text = (CONF / "data" / f"{name}.yaml").read_text()
        assert f"_target_: {fn.__module__}.load" in text


def test_bad_input_is_a_feature_error_so_the_cli_prints_one_line(tmp_path):
    from within.features.spec import FeatureError

    write_example_csv(tmp_path / "ads.csv")
    with pytest.raises(FeatureError):  # within.pipeline.console.exit_on_user_error catches this class
        csv_file.load(tmp_path, file="ads.csv", spec=EXAMPLE_SPEC)
