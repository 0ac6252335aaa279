"""Telco churn loader: shape, types and label rate against a plain csv read, the blank TotalCharges,
and errors that name the column and the line."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.conftest import needs_data
from within.data.loaders import telco
from within.features.spec import FeatureError

HEADER = telco.COLUMNS
GOOD = ["7590-VHVEG", "Female", "0", "Yes", "No", "1", "No", "No phone service", "DSL", "No", "Yes", "No", "No",
        "No", "No", "Month-to-month", "Yes", "Electronic check", "29.85", "29.85", "No"]


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    return path.parent


def test_shared_file_types_and_counts():
    root = needs_data("telco_customer_churn")
    df = telco.load(root)
    with open(root / "Telco-Customer-Churn.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert df.shape == (len(rows), 21) == (7043, 21)
    assert list(df.columns) == list(rows[0])
    assert int(df["Churn"].sum()) == sum(r["Churn"] == "Yes" for r in rows) == 1869
    assert df["Churn"].dtype == np.int64 and df["tenure"].dtype == np.int64 and df["SeniorCitizen"].dtype == np.int64
    assert df["MonthlyCharges"].dtype == np.float64 and df["TotalCharges"].dtype == np.float64
    assert df["customerID"].is_unique and df["Contract"].isin(["Month-to-month", "One year", "Two year"]).all()
    blank = [i for i, r in enumerate(rows) if not r["TotalCharges"].strip()]
    assert len(blank) == 11
    assert (df.loc[blank, "tenure"] == 0).all() and (df.loc[blank, "TotalCharges"] == 0.0).all()
    filled = [i for i in range(len(rows)) if i not in set(blank)]
    np.testing.assert_allclose(df.loc[filled, "TotalCharges"], [float(rows[i]["TotalCharges"]) for i in filled])


def test_blank_total_with_tenure_becomes_tenure_times_monthly(tmp_path):
    row = list(GOOD)
    row[HEADER.index("tenure")], row[HEADER.index("TotalCharges")] = "3", " "
    df = telco.load(_write(tmp_path / "Telco-Customer-Churn.csv", [GOOD, row]))
    assert df["TotalCharges"].tolist() == [29.85, pytest.approx(3 * 29.85)]
    assert df["Churn"].tolist() == [0, 0]


@pytest.mark.parametrize(("column", "value", "message"), [
    ("MonthlyCharges", "abc", "line 3, column 'MonthlyCharges': expected a number, got 'abc'"),
    ("tenure", "2.5", "line 3, column 'tenure': expected a whole number, got '2.5'"),
    ("Churn", "Maybe", "line 3, column 'Churn': expected Yes or No, got 'Maybe'"),
    ("SeniorCitizen", "2", "line 3, column 'SeniorCitizen': expected 0 or 1, got '2'"),
    ("Contract", "", "line 3, column 'Contract': expected a category, got ''"),
])
def test_bad_values_name_the_column_and_line(tmp_path, column, value, message):
    row = list(GOOD)
    row[HEADER.index(column)] = value
    with pytest.raises(FeatureError, match=message):
        telco.load(_write(tmp_path / "Telco-Customer-Churn.csv", [GOOD, row]))


def test_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "Telco-Customer-Churn.csv"
    path.write_text("customerID,gender\nx,Male\n")
    with pytest.raises(FeatureError, match=r"header lacks columns \['SeniorCitizen'"):
        telco.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="telco: expected data file"):
        telco.load(tmp_path / "nowhere")
