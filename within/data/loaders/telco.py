"""IBM Telco customer churn (Telco-Customer-Churn.csv): one row per customer, label `Churn`.

Columns keep the file's names. `customerID` and the service / contract / billing fields are str;
`SeniorCitizen` (0/1) and `tenure` (months) are int64; `MonthlyCharges` and `TotalCharges` float64;
`Churn` Yes/No becomes int64 1/0. The file's 11 blank `TotalCharges` (" ") are customers with
tenure 0 who were never billed: a blank becomes `tenure * MonthlyCharges`, which is 0.0 for them
(and the best estimate of the total, were a blank to appear with tenure > 0). Anything else that
is not a number, an unknown `Churn` / `SeniorCitizen` value or a missing column raises
`FeatureError` naming the column and the file line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, locate_file, str_column
from within.features.spec import FeatureError

log = logging.getLogger(__name__)

ID = "customerID"
LABEL = "Churn"
CATEGORICAL = [
    "gender", "Partner", "Dependents", "PhoneService", "MultipleLines", "InternetService", "OnlineSecurity",
    "OnlineBackup", "DeviceProtection", "TechSupport", "StreamingTV", "StreamingMovies", "Contract",
    "PaperlessBilling", "PaymentMethod",
]
INTEGER = ["SeniorCitizen", "tenure"]
FLOAT = ["MonthlyCharges", "TotalCharges"]
# the file's column order
COLUMNS = [ID, "gender", "SeniorCitizen", "Partner", "Dependents", "tenure", *CATEGORICAL[3:], *FLOAT, LABEL]
# Byte-exact copy of IBM/telco-customer-churn-on-icp4d data/Telco-Customer-Churn.csv at d5371f5.
FILES = (
    RemoteFile(
        "Telco-Customer-Churn.csv",
        "https://raw.githubusercontent.com/IBM/telco-customer-churn-on-icp4d/"
        "d5371f5d83a446ad5673cbcca3b814b926491f8a/data/Telco-Customer-Churn.csv",
        "16320c9c1ec72448db59aa0a26a0b95401046bef5d02fd3aeb906448e3055e91",
    ),
)


def _bad(path: Path, i: int, col: str, expected: str, got: object) -> FeatureError:
    return FeatureError(f"telco: {path} line {i + 2}, column '{col}': expected {expected}, got {got!r}")


def _numbers(raw: pd.DataFrame, col: str, path: Path, whole: bool, blank_ok: bool = False) -> pd.Series:
    text = raw[col].str.strip()
    num = pd.to_numeric(text.replace("", np.nan), errors="coerce")
    bad = num.isna() & ~(blank_ok & (text == ""))
    if whole:
        bad = bad | (num.notna() & (num % 1 != 0))
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise _bad(path, i, col, "a whole number" if whole else "a number", raw[col].iloc[i])
    return num


def load(root: str | Path | None, download: bool = False, file: str = "Telco-Customer-Churn.csv") -> pd.DataFrame:
    """Read the Telco file with typed columns (see the module docstring) and `Churn` as 0/1."""
    path = locate_file("telco", root, FILES, file, download)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise FeatureError(f"telco: {path}: header lacks columns {missing}; found {list(raw.columns)}")

    out = pd.DataFrame({ID: str_column(raw[ID].str.strip())})
    for col in CATEGORICAL:
        values = raw[col].str.strip()
        empty = (values == "").to_numpy()
        if empty.any():
            raise _bad(path, int(np.argmax(empty)), col, "a category", raw[col].iloc[int(np.argmax(empty))])
        out[col] = str_column(values)
    for col in INTEGER:
        out[col] = _numbers(raw, col, path, whole=True).astype(np.int64)
    senior = ~out["SeniorCitizen"].isin([0, 1]).to_numpy()
    if senior.any():
        raise _bad(path, int(np.argmax(senior)), "SeniorCitizen", "0 or 1", raw["SeniorCitizen"].iloc[int(np.argmax(senior))])
    if (out["tenure"] < 0).any():
        i = int(np.argmax((out["tenure"] < 0).to_numpy()))
        raise _bad(path, i, "tenure", "a count of months >= 0", raw["tenure"].iloc[i])
    out["MonthlyCharges"] = _numbers(raw, "MonthlyCharges", path, whole=False).astype(np.float64)
    total = _numbers(raw, "TotalCharges", path, whole=False, blank_ok=True)
    blank = total.isna()
    if blank.any():
        log.info("telco: %d blank TotalCharges set to tenure * MonthlyCharges (tenure of those rows: %s)",
                 int(blank.sum()), sorted(set(out.loc[blank, "tenure"].tolist())))
    out["TotalCharges"] = total.fillna(out["tenure"] * out["MonthlyCharges"]).astype(np.float64)

    churn = raw[LABEL].str.strip()
    bad = ~churn.isin(["Yes", "No"]).to_numpy()
    if bad.any():
        raise _bad(path, int(np.argmax(bad)), LABEL, "Yes or No", raw[LABEL].iloc[int(np.argmax(bad))])
    out[LABEL] = (churn == "Yes").astype(np.int64).to_numpy()
    return out[COLUMNS]
