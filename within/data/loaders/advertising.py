"""`advertising.csv` ("Clicked on Ad"): 1,000 rows of course data that is almost certainly generated.

Cities and ad topic lines are Faker-style strings and the label is exactly 500/500. Use it only as a
smoke test of the text + tabular + time path, never as evidence of real-world performance.
Columns: numerics (daily_time_on_site, age, area_income, daily_internet_usage), text `ad_topic`,
categoricals (male, city, country), `timestamp` (2016-01-01..2016-07-24, not sorted in the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, binary_label, locate_file, str_column
from within.features.spec import FeatureError

RENAME = {
    "Daily Time Spent on Site": "daily_time_on_site",
    "Age": "age",
    "Area Income": "area_income",
    "Daily Internet Usage": "daily_internet_usage",
    "Ad Topic Line": "ad_topic",
    "City": "city",
    "Male": "male",
    "Country": "country",
    "Timestamp": "timestamp",
    "Clicked on Ad": "clicked",
}
NUMERIC = ["daily_time_on_site", "age", "area_income", "daily_internet_usage"]


def _drop_leading_blank_lines(data: bytes) -> bytes:
    return data.lstrip(b"\r\n")


# The upstream file starts with an empty line that the shared copy removed. We drop it after download
# and check the result against the SHA-256 of the shared copy; this was not re-verified online.
FILES = (
    RemoteFile(
        "advertising.csv",
        "https://raw.githubusercontent.com/My-Machine-Learning-Projects-CT/Logistic-Regression-with-Python-Part-2/"
        "04dc75c9251c396c2eb95a3a037d4ac0f22ba707/advertising.csv",
        "00f638aa4103ebf52935d3a62a60328100cc02a8111ca2b4769b4b3596f498f9",
        fix=_drop_leading_blank_lines,
    ),
)


def load(root: str | Path | None, download: bool = False, file: str = "advertising.csv") -> pd.DataFrame:
    """Read advertising.csv into snake_case columns; `clicked` 0/1, `timestamp` datetime64."""
    path = locate_file("advertising", root, FILES, file, download)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])  # blank first lines are skipped
    missing = [c for c in RENAME if c not in raw.columns]
    if missing:
        raise FeatureError(f"advertising: {path}: header lacks columns {missing}; found {list(raw.columns)}")
    raw = raw.rename(columns=RENAME)[list(RENAME.values())]
    out = pd.DataFrame(index=raw.index)
    for col in NUMERIC:
        num = pd.to_numeric(raw[col], errors="coerce")
        bad = num.isna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise FeatureError(
                f"advertising: {path} line {i + 2}, column '{col}': "
                f"expected a number, got {raw[col].iloc[i]!r}"
            )
        out[col] = num.astype(np.float64)
    for col in ["ad_topic", "city", "country"]:
        out[col] = str_column(raw[col])
    male = raw["male"].str.strip()
    if not male.isin(["0", "1"]).all():
        i = int(np.argmax(~male.isin(["0", "1"]).to_numpy()))
        raise FeatureError(
            f"advertising: {path} line {i + 2}, column 'Male': expected 0 or 1, got {raw['male'].iloc[i]!r}"
        )
    out["male"] = male
    ts = pd.to_datetime(raw["timestamp"], format="%Y-%m-%d %H:%M:%S", errors="coerce")
    if ts.isna().any():
        i = int(np.argmax(ts.isna().to_numpy()))
        raise FeatureError(
            f"advertising: {path} line {i + 2}, column 'Timestamp': expected YYYY-MM-DD HH:MM:SS, "
            f"got {raw['timestamp'].iloc[i]!r}"
        )
    out["timestamp"] = ts
    out["clicked"] = binary_label(raw["clicked"], "advertising", path, first_data_line=2).to_numpy()
    return out
