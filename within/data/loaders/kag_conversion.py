"""Facebook ad campaign conversions ("Sales Conversion Optimization", KAG_conversion_data.csv).

One aggregated row per ad: the hierarchy campaign (`campaign_id`, from xyz_campaign_id) -> ad set
(`fb_campaign_id`) -> `ad_id`, the audience (age bucket, gender, interest code), and outcomes.
For CTR the label is `clicked` = Clicks (a COUNT) with `impressions` as the binomial weight.
Conversions are kept as extra columns (`conversions` = Total_Conversion, `approved_conversions`),
and so is `spent`; none of them is a feature, since each is an outcome of the clicks (leakage).
Rows with impressions <= 0 or clicks outside [0, impressions] cannot be a binomial count; they are
dropped with a warning that gives their number (the shared file has none). No time column.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, locate_file, str_column
from within.features.spec import FeatureError

log = logging.getLogger(__name__)

RENAME = {
    "ad_id": "ad_id",
    "xyz_campaign_id": "campaign_id",
    "fb_campaign_id": "fb_campaign_id",
    "age": "age",
    "gender": "gender",
    "interest": "interest",
    "Impressions": "impressions",
    "Clicks": "clicked",
    "Spent": "spent",
    "Total_Conversion": "conversions",
    "Approved_Conversion": "approved_conversions",
}
CATEGORICAL = ["campaign_id", "fb_campaign_id", "ad_id", "age", "gender", "interest"]
COUNTS = ["impressions", "clicked", "conversions", "approved_conversions"]
# Byte-exact copy (UTF-8 BOM, CRLF) of ashish-cell/BADM-211-FA21 Data/KAG_conversion_data.csv at 22d5e87.
FILES = (
    RemoteFile(
        "KAG_conversion_data.csv",
        "https://raw.githubusercontent.com/ashish-cell/BADM-211-FA21/"
        "22d5e87600993bbfdf43eea16c34aaf554d01239/Data/KAG_conversion_data.csv",
        "195908a389aa46379c7ba6526c5714eebd28d309ae25114873fca9a57a0b1f0e",
    ),
)


def load(
    root: str | Path | None, download: bool = False, file: str = "KAG_conversion_data.csv"
) -> pd.DataFrame:
    """Read the KAG file: ids/audience as str, counts int64, `spent` float64; drop impossible rows."""
    path = locate_file("kag_conversion", root, FILES, file, download)
    raw = pd.read_csv(path, dtype=str, encoding="utf-8-sig", keep_default_na=False, na_values=[""])
    missing = [c for c in RENAME if c not in raw.columns]
    if missing:
        raise FeatureError(f"kag_conversion: {path}: header lacks columns {missing}; found {list(raw.columns)}")
    raw = raw.rename(columns=RENAME)[list(RENAME.values())]

    out = pd.DataFrame({col: str_column(raw[col]) for col in CATEGORICAL})
    for col in [*COUNTS, "spent"]:
        num = pd.to_numeric(raw[col], errors="coerce")
        bad = num.isna().to_numpy()
        if col in COUNTS:
            bad = bad | ((num.fillna(0) % 1) != 0).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            src = next(k for k, v in RENAME.items() if v == col)
            kind = "a whole number" if col in COUNTS else "a number"
            raise FeatureError(
                f"kag_conversion: {path} line {i + 2}, column '{src}': "
                f"expected {kind}, got {raw[col].iloc[i]!r}"
            )
        out[col] = num.astype(np.int64) if col in COUNTS else num.astype(np.float64)
    for col in CATEGORICAL:
        if out[col].isna().any():
            i = int(np.argmax(out[col].isna().to_numpy()))
            raise FeatureError(f"kag_conversion: {path} line {i + 2}, column '{col}': empty value")

    impossible = (out["impressions"] <= 0) | (out["clicked"] < 0) | (out["clicked"] > out["impressions"])
    if impossible.any():
        lines = (np.flatnonzero(impossible.to_numpy()) + 2)[:5].tolist()
        log.warning(
            "kag_conversion: dropping %d of %d rows with impressions <= 0 or clicks outside [0, impressions] "
            "(first file lines: %s)",
            int(impossible.sum()),
            len(out),
            lines,
        )
        out = out.loc[~impossible].reset_index(drop=True)
    return out
