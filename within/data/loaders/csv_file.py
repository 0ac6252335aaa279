"""Your own CSV, checked against a features spec you write (see conf/features/csv.yaml).

Every problem is reported as a FeatureError (one `error:` line from train.py) that names the data row (1 = first row after the header),
its line in the file, the column and the fix, e.g.
`row 17 (line 18), column 'budget': expected a number, got 'abc'`.
Checks: header has every spec column, each row has as many fields as the header, numeric columns
parse as numbers, required cells are not empty, the label is 0/1 (or, with `weight`, a click count
within [0, impressions] and impressions > 0), and the time column parses as a date or a number.
Image fields are rejected: a CSV cell cannot hold pixels. A `.parquet` file is read by
within/data/loaders/parquet_file.py instead (typed columns, the same checks).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from within.data.loaders._common import not_found, str_column
from within.features.spec import FeatureError, FeatureSpec

log = logging.getLogger(__name__)


def read_spec(spec: Any) -> FeatureSpec:
    """A FeatureSpec from a YAML path, a dict / omegaconf node, or a FeatureSpec."""
    if isinstance(spec, FeatureSpec):
        return spec
    if isinstance(spec, (str, Path)):
        from omegaconf import OmegaConf

        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"csv: features spec {path} does not exist; pass spec=<path to a features YAML>"
            )
        return FeatureSpec.from_config(OmegaConf.load(path))
    if isinstance(spec, Mapping) or hasattr(spec, "_metadata"):
        return FeatureSpec.from_config(spec)
    raise TypeError(f"csv: spec must be a YAML path, a dict or a FeatureSpec, got {type(spec).__name__}")


def _scan_records(path: Path, sep: str, encoding: str) -> tuple[list[str], np.ndarray]:
    """Check field counts row by row; return the header and the first file line of each data row.

    pandas pads short rows with NaN silently, so the count is checked here, with the csv module.
    """
    lines: list[int] = []
    with open(path, newline="", encoding=encoding) as fh:
        reader = csv.reader(fh, delimiter=sep)
        header: list[str] | None = None
        prev_end = 0
        for record in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not record:  # blank line; pandas skips it as well
                continue
            if header is None:
                header = record
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup:
                    raise FeatureError(f"csv: {path} header: column names repeat: {dup}; make them unique")
                continue
            if len(record) != len(header):
                row = len(lines) + 1
                raise FeatureError(
                    f"csv: {path} row {row} (line {start}): expected {len(header)} fields like the header, "
                    f"got {len(record)}; check for an unquoted '{sep}' inside a value or a missing cell"
                )
            lines.append(start)
    if header is None or not lines:
        raise FeatureError(f"csv: {path} has no data rows; expected a header line and at least one row")
    return header, np.asarray(lines)


def load(
    root: str | Path | None,
    file: str | Path | None = None,
    spec: Any = None,
    label: str | None = None,
    rename: Mapping[str, str] | None = None,
    sep: str = ",",
    encoding: str = "utf-8-sig",
    na_values: Sequence[str] = ("",),
    download: bool = False,
) -> pd.DataFrame:
    """Read `root/file` and return the spec's fields + label (+ weight, time, truth), validated.

    label: the CSV's name for the label column when it is not the spec's `label` (renamed to it).
    rename: {csv column: spec name} for any other columns whose names differ.
    na_values: cell texts that mean "missing" (default: only the empty cell).
    """
    if download:
        raise FeatureError(
            "csv: download=true is not available for your own CSV; set data.source.file to its path"
        )
    if file is None:  # Hydra leaves a `???` file out of the partial, so it arrives here as None
        raise FeatureError("csv: no CSV given; set data.source.file=/path/to/ads.csv")
    if spec is None:
        raise FeatureError("csv: no features spec given; pass spec=<YAML path or dict> (data.source.spec)")
    fs = read_spec(spec)
    images = [f.name for f in fs.image]
    if images:
        raise FeatureError(f"csv: image fields {images} cannot be read from a CSV; remove them from the spec")
    path = Path(root).expanduser() / file if root is not None else Path(file).expanduser()
    if not path.is_file():
        raise not_found("csv", path, can_download=False)
    if path.suffix.lower() == ".parquet":  # typed columns: no parsing, the same spec checks
        from within.data.loaders.parquet_file import load as load_parquet

        return load_parquet(path, fs, label=label, rename=rename)

    header, lines = _scan_records(path, sep, encoding)
    renames = dict(rename or {})
    if label is not None and label != fs.label:
        renames[label] = fs.label
    wanted = {f.name: f for f in fs.fields}
    extras = [c for c in (fs.label, fs.weight, fs.time, fs.truth) if c]
    present = {renames.get(c, c) for c in header}
    needed = [f.name for f in fs.fields if f.required] + [fs.label] + ([fs.weight] if fs.weight else [])
    needed += [fs.time] if fs.time else []
    absent = [c for c in needed if c not in present]
    if absent:
        raise FeatureError(
            f"csv: {path}: column '{absent[0]}' is in the spec but not in the header (missing: {absent}; "
            f"header: {header}); rename the CSV column, pass rename={{csv_name: spec_name}} or label=..., "
            f"or fix the spec"
        )

    raw = pd.read_csv(
        path,
        sep=sep,
        dtype=str,
        encoding=encoding,
        keep_default_na=False,
        na_values=list(na_values),
        engine="c",
    ).rename(columns=renames)
    unused = [c for c in raw.columns if c not in wanted and c not in extras]
    if unused:
        log.info("csv: %s: ignoring columns not in the spec: %s", path, unused)

    def fail(i: int, col: str, msg: str) -> FeatureError:
        return FeatureError(f"csv: {path} row {i + 1} (line {lines[i]}), column '{col}': {msg}")

    def numbers(col: str, required: bool) -> pd.Series:
        num = pd.to_numeric(raw[col], errors="coerce")  # tolerates surrounding spaces
        bad = (num.isna() & raw[col].notna()).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(i, col, f"expected a number, got {raw[col].iloc[i]!r}")
        if required and num.isna().any():
            raise fail(
                int(np.argmax(num.isna().to_numpy())),
                col,
                f"empty cell in a required column; fill it or set required: false for '{col}' in the spec",
            )
        return num.astype(np.float64)

    out = pd.DataFrame(index=raw.index)
    for f in fs.fields:
        if f.name not in raw.columns:  # optional and absent: an all-missing column
            out[f.name] = np.nan if f.type == "numeric" else str_column(pd.Series([np.nan] * len(raw)))
            continue
        if f.type == "numeric":
            out[f.name] = numbers(f.name, f.required)
            continue
        col = str_column(raw[f.name])
        if f.required and col.isna().any():
            raise fail(
                int(np.argmax(col.isna().to_numpy())),
                f.name,
                f"empty cell in a required column; fill it or set required: false for '{f.name}' in the spec",
            )
        out[f.name] = col

    y = numbers(fs.label, required=True)
    if fs.weight:
        w = numbers(fs.weight, required=True)
        bad = ((w <= 0) | (w % 1 != 0)).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(
                i, fs.weight, f"impressions must be a whole number > 0, got {raw[fs.weight].iloc[i]!r}"
            )
        bad = ((y < 0) | (y % 1 != 0) | (y > w)).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(
                i,
                fs.label,
                f"clicks must be a whole number in [0, {fs.weight}={w.iloc[i]:g}], "
                f"got {raw[fs.label].iloc[i]!r}",
            )
        out[fs.label] = y.astype(np.int64)
        out[fs.weight] = w.astype(np.int64)
    else:
        bad = ~y.isin([0.0, 1.0]).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(
                i,
                fs.label,
                f"expected 0 or 1, got {raw[fs.label].iloc[i]!r} "
                "(for aggregated rows set weight: <impressions column> in the spec)",
            )
        out[fs.label] = y.astype(np.int64)

    if fs.time:
        out[fs.time] = _parse_time(raw[fs.time], fail, fs.time)
    if fs.truth and fs.truth in raw.columns:
        out[fs.truth] = numbers(fs.truth, required=False)
    fs.validate_frame(out, require_label=True)  # the same checks training applies, as a last guard
    return out


def _parse_time(col: pd.Series, fail: Any, name: str) -> pd.Series:
    """Numbers (e.g. epoch seconds) stay numeric; anything else must parse as ISO 8601 dates/times."""
    if col.isna().any():
        raise fail(int(np.argmax(col.isna().to_numpy())), name, "empty time cell; every row needs a time")
    num = pd.to_numeric(col.str.strip(), errors="coerce")
    if num.notna().all():
        return num.astype(np.float64)
    ts = pd.to_datetime(col.str.strip(), errors="coerce", format="ISO8601")
    if ts.isna().any():
        i = int(np.argmax(ts.isna().to_numpy()))
        raise fail(
            i,
            name,
            f"expected an ISO date/time such as 2024-05-01 or 2024-05-01T13:00:00, "
            f"or a number, got {col.iloc[i]!r}",
        )
    return ts
