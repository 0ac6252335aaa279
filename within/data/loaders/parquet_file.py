"""Your own Parquet file, checked against a features spec (``data=csv data.source.file=ads.parquet``).

Parquet keeps column types, so a cell needs no parsing; each column is still brought to the
type the spec asks for: numeric -> float64, categorical / group / text -> strings (missing kept as
NaN), the label -> int64 0/1 (or clicks within [0, impressions] with a `weight` column). Only the
spec's columns are read. `read_rows` serves the streaming path (within/data/streaming.py): one
row range at a time, read row group by row group with ``ParquetFile.iter_batches``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from within.data.loaders._common import not_found, str_column
from within.features.spec import FeatureError, FeatureSpec


def spec_columns(fs: FeatureSpec, names: list[str], renames: Mapping[str, str]) -> list[str]:
    """The file's names of the columns the spec needs (fields, label, weight, time, truth)."""
    back = {v: k for k, v in renames.items()}
    wanted = [f.name for f in fs.fields] + [c for c in (fs.label, fs.weight, fs.time, fs.truth) if c]
    present = set(names)
    cols = [back.get(c, c) for c in wanted if back.get(c, c) in present]
    needed = [f.name for f in fs.fields if f.required] + [fs.label] + [c for c in (fs.weight, fs.time) if c]
    absent = [c for c in needed if back.get(c, c) not in present]
    if absent:
        raise FeatureError(
            f"parquet: column '{absent[0]}' is in the spec but not in the file (missing: {absent}; "
            f"columns: {names[:30]}); rename the column, pass rename={{file_name: spec_name}} or label=..., "
            "or fix the spec"
        )
    return cols


def normalize(raw: pd.DataFrame, fs: FeatureSpec, where: str, row0: int = 0) -> pd.DataFrame:
    """The spec's columns of `raw` in the types training expects; errors name the row and column."""

    def fail(i: int, col: str, msg: str) -> FeatureError:
        return FeatureError(f"parquet: {where} row {row0 + i + 1}, column '{col}': {msg}")

    def numbers(col: str, required: bool) -> pd.Series:
        num = pd.to_numeric(raw[col], errors="coerce")
        bad = (num.isna() & raw[col].notna()).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(i, col, f"expected a number, got {raw[col].iloc[i]!r}")
        if required and num.isna().any():
            raise fail(int(np.argmax(num.isna().to_numpy())), col,
                       f"empty cell in a required column; fill it or set required: false for '{col}' in the spec")
        return num.astype(np.float64)

    out = pd.DataFrame(index=raw.index)
    for f in fs.fields:
        if f.type == "image":
            raise FeatureError(f"parquet: image field '{f.name}' is not read from files; remove it from the spec")
        if f.name not in raw.columns:
            out[f.name] = np.nan if f.type == "numeric" else str_column(pd.Series([np.nan] * len(raw), index=raw.index))
        elif f.type == "numeric":
            out[f.name] = numbers(f.name, f.required)
        else:
            out[f.name] = str_column(raw[f.name]).to_numpy(dtype=object)
    y = numbers(fs.label, required=True)
    if fs.weight:
        w = numbers(fs.weight, required=True)
        bad = ((w <= 0) | (w % 1 != 0) | (y < 0) | (y % 1 != 0) | (y > w)).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(i, fs.label, f"clicks {y.iloc[i]:g} must be a whole number in [0, {fs.weight}={w.iloc[i]:g}]")
        out[fs.weight] = w.astype(np.int64)
    else:
        bad = ~y.isin([0.0, 1.0]).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise fail(i, fs.label, f"expected 0 or 1, got {raw[fs.label].iloc[i]!r} "
                                    "(for aggregated rows set weight: <impressions column> in the spec)")
    out[fs.label] = y.astype(np.int64)
    if fs.time:
        t = raw[fs.time]
        out[fs.time] = t if pd.api.types.is_datetime64_any_dtype(t) else numbers(fs.time, required=True)
    if fs.truth and fs.truth in raw.columns:
        out[fs.truth] = numbers(fs.truth, required=False)
    return out


class ParquetRows:
    """Row ranges of one Parquet file, read row group by row group (the streaming shards)."""

    def __init__(self, path: str | Path, spec: Any, label: str | None = None,
                 rename: Mapping[str, str] | None = None) -> None:
        import pyarrow.parquet as pq

        from within.data.loaders.csv_file import read_spec

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise not_found("parquet", self.path, can_download=False)
        self.spec = read_spec(spec)
        self.renames = dict(rename or {})
        if label is not None and label != self.spec.label:
            self.renames[label] = self.spec.label
        meta = pq.ParquetFile(self.path).metadata
        self.columns = spec_columns(self.spec, list(meta.schema.names), self.renames)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.n_rows = int(self.offsets[-1])
        self._file = None

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker opens the file itself
        return {**self.__dict__, "_file": None}

    def shard_bounds(self) -> np.ndarray:
        """Row offsets where row groups start (and the end): shards never straddle a row group."""
        return self.offsets

    def rows(self, lo: int, hi: int) -> pd.DataFrame:
        """Rows lo:hi of the file (row index = file position), normalised to the spec."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._file is None:
            self._file = pq.ParquetFile(self.path)
        first = int(np.searchsorted(self.offsets, lo, side="right") - 1)
        parts = []
        for g in range(first, len(self.offsets) - 1):
            g_lo = int(self.offsets[g])
            if g_lo >= hi:
                break
            pos = g_lo
            for rb in self._file.iter_batches(batch_size=65_536, row_groups=[g], columns=self.columns):
                a, b = max(lo, pos) - pos, min(hi, pos + rb.num_rows) - pos
                if b > a:
                    parts.append(rb.slice(a, b - a))
                pos += rb.num_rows
                if pos >= hi:
                    break
        if parts:
            raw = pa.Table.from_batches(parts).to_pandas()
        else:
            raw = self._file.schema_arrow.empty_table().select(self.columns).to_pandas()
        raw = raw.rename(columns=self.renames)
        raw.index = pd.RangeIndex(lo, lo + len(raw))
        return normalize(raw, self.spec, str(self.path), row0=lo)


def load(file: str | Path, spec: Any, label: str | None = None, rename: Mapping[str, str] | None = None,
         root: str | Path | None = None) -> pd.DataFrame:
    """The whole file (only the spec's columns), normalised and validated like a CSV."""
    path = Path(root).expanduser() / file if root is not None else Path(file).expanduser()
    rows = ParquetRows(path, spec, label=label, rename=rename)
    if rows.n_rows == 0:
        raise FeatureError(f"parquet: {path} has no rows")
    out = rows.rows(0, rows.n_rows).reset_index(drop=True)
    rows.spec.validate_frame(out, require_label=True)
    return out
