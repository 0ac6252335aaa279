"""Avazu CTR Prediction (Kaggle 2014): the first 8,999 rows of `train.csv`.

Every feature is an anonymised categorical (integer codes such as C1, banner_pos and C14..C21 are
codes too, so all are kept as strings). `hour` (YYMMDDHH, UTC) becomes `timestamp` (naive datetime,
UTC) for the time split, plus `hour_of_day` and `weekday` categoricals. `id` is a row id and is
dropped. This sample is a single hour (2014-10-21 00:00), so every timestamp ties and a time split
falls back to file order (the datamodule sorts stably); on the full file it is a real time split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, binary_label, locate_file, str_column
from within.features.spec import FeatureError

CATEGORICAL = [
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
]
# Byte-exact copy of Lapis-Hong/Wide-ResDNN data/avazu/train at bd35aa7 (SHA-256 of the shared file).
FILES = (
    RemoteFile(
        "avazu_train_8999.csv",
        "https://raw.githubusercontent.com/Lapis-Hong/Wide-ResDNN/"
        "bd35aa733b683b8842daae297d1073e5d46f0eb3/data/avazu/train",
        "0ad2f8bc25d000a4e5120413ccb1a1b329387091ba0ceb5a342ea0ffe236dad4",
    ),
)


def load(
    root: str | Path | None,
    download: bool = False,
    file: str = "avazu_train_8999.csv",
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read Avazu CSV into `clicked`, `timestamp`, `hour_of_day`, `weekday` and the 21 categoricals (str)."""
    path = locate_file("avazu", root, FILES, file, download)
    raw = pd.read_csv(
        path,
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        quoting=csv.QUOTE_NONE,
        nrows=nrows,
        engine="c",
    )
    missing = [c for c in ["click", "hour", *CATEGORICAL] if c not in raw.columns]
    if missing:
        raise FeatureError(f"avazu: {path}: header lacks columns {missing}; found {list(raw.columns)}")
    # line 1 is the header, so data row i sits on line i + 2
    out = pd.DataFrame({"clicked": binary_label(raw["click"], "avazu", path, first_data_line=2)})
    ts = pd.to_datetime(raw["hour"], format="%y%m%d%H", errors="coerce")
    bad = ts.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise FeatureError(
            f"avazu: {path} line {i + 2}, column 'hour': expected YYMMDDHH, got {raw['hour'].iloc[i]!r}"
        )
    out["timestamp"] = ts
    out["hour_of_day"] = ts.dt.strftime("%H")
    out["weekday"] = ts.dt.day_name()
    for col in CATEGORICAL:
        out[col] = str_column(raw[col])
    return out
