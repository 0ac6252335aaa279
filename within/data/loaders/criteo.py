"""Criteo Display Advertising Challenge (Kaggle 2014): the first 8,000 lines of day 1, in time order.

Tab-separated, no header, 40 columns: label, I1..I13 (integer counts, empty = missing, I2 can be
negative), C1..C26 (32-bit hashed categoricals as hex, empty = missing). Missing numerics stay NaN
and missing categoricals stay NaN (the feature processor maps them to OOV); the spec marks every
feature `required: false`. There is no time column, but the lines are in time order, so the data
config splits by row order. Works unchanged on the full Kaggle `train.txt` via `file=`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, binary_label, locate_file, str_column
from within.features.spec import FeatureError

NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
# Byte-exact copy of Lapis-Hong/Wide-ResDNN data/criteo/train at bd35aa7 (SHA-256 of the shared file).
FILES = (
    RemoteFile(
        "criteo_train_8000.txt",
        "https://raw.githubusercontent.com/Lapis-Hong/Wide-ResDNN/"
        "bd35aa733b683b8842daae297d1073e5d46f0eb3/data/criteo/train",
        "26d49047cbe0ad6ce54197918d71a2dc6688b72b29de7235c9321301116fff6c",
    ),
)


def load(
    root: str | Path | None,
    download: bool = False,
    file: str = "criteo_train_8000.txt",
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read Criteo TSV into `clicked`, I1..I13 (float64, NaN = missing), C1..C26 (str, NaN = missing)."""
    path = locate_file("criteo", root, FILES, file, download)
    names = ["clicked", *NUMERIC, *CATEGORICAL]
    # Only the empty string is missing: no hashed value can collide with pandas' default NA words.
    raw = pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=names,
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        quoting=csv.QUOTE_NONE,
        nrows=nrows,
        engine="c",
    )
    out = pd.DataFrame({"clicked": binary_label(raw["clicked"], "criteo", path, first_data_line=1)})
    for col in NUMERIC:
        num = pd.to_numeric(raw[col], errors="coerce")
        bad = (num.isna() & raw[col].notna()).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise FeatureError(
                f"criteo: {path} line {i + 1}, column '{col}': "
                f"expected an integer or empty, got {raw[col].iloc[i]!r}"
            )
        out[col] = num.astype(np.float64)
    for col in CATEGORICAL:
        out[col] = str_column(raw[col])
    return out
