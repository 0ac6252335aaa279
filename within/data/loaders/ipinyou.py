"""iPinYou RTB sample (advertiser 2997) from wnzhang/deep-ctr, decoded from libFM one-hot back to 16 fields.

`train.fm.txt` lines are `label idx:1 idx:1 ...` with one index per field; `featindex.fm.txt` maps
`field:value<TAB>index`. Each row becomes 16 string columns named by field (weekday, hour, useragent,
IP, region, city, adexchange, domain, slotid, slotwidth, slotheight, slotvisibility, slotformat,
creative, advertiser, slotprice) plus `clicked`. The value "other" is make-ipinyou-data's bucket for
values too rare to index; it is kept as an ordinary category.

There is no timestamp, and the rows are not in time order: the sample is one weekday (2) and hours
16-19 appear evenly mixed across every tenth of the file. So the data config splits at random.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, binary_label, locate, str_column
from within.features.spec import FeatureError

_BASE = "https://raw.githubusercontent.com/wnzhang/deep-ctr/229ad52cb97bc213012ba596b451990dcca6b897/data/"
# SHA-256 of the shared byte-exact copies of these two files at that commit.
FILES = (
    RemoteFile(
        "train.fm.txt",
        _BASE + "train.fm.txt",
        "9e7de462cfe384f3c694b8456d2bcb96013be4c1dd1fc3008bb8cfb97dc3481b",
    ),
    RemoteFile(
        "featindex.fm.txt",
        _BASE + "featindex.fm.txt",
        "378c58e56135890b1261f3d38d3fce53580a04e5d0d2ee08145de819c1bdbb3e",
    ),
)


def read_featindex(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (field names in index order, field id per feature index, value per feature index)."""
    # keep_default_na=False: values such as "null" and "Na" are real categories here
    fi = pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=["key", "index"],
        dtype={"key": str},
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
    )
    parts = fi["key"].str.partition(":")
    if (parts[1] != ":").any():
        i = int(np.argmax((parts[1] != ":").to_numpy()))
        raise FeatureError(
            f"ipinyou: {path} line {i + 1}: expected 'field:value<TAB>index', got {fi['key'].iloc[i]!r}"
        )
    idx = fi["index"].to_numpy(dtype=np.int64)
    fields = list(dict.fromkeys(parts[0].iloc[np.argsort(idx, kind="stable")]))
    field_id = {f: k for k, f in enumerate(fields)}
    size = int(idx.max()) + 1
    fid = np.full(size, -1, dtype=np.int64)
    val = np.empty(size, dtype=object)
    fid[idx] = parts[0].map(field_id).to_numpy()
    val[idx] = parts[2].to_numpy(dtype=object)
    return fields, fid, val


def load(
    root: str | Path | None,
    download: bool = False,
    file: str = "train.fm.txt",
    featindex: str = "featindex.fm.txt",
) -> pd.DataFrame:
    """Decode `root/file` (libFM) with `root/featindex` into one string column per field plus `clicked`."""
    files = [f for f in FILES if f.name in (file, featindex)]
    if len(files) < 2:  # a user's own files: no pinned URL
        download = False
        files = [RemoteFile(file, "", ""), RemoteFile(featindex, "", "")]
    folder = locate("ipinyou", root, files, download)
    fields, fid, val = read_featindex(folder / featindex)
    path = folder / file
    n_fields = len(fields)

    raw = pd.read_csv(
        path,
        sep=" ",
        header=None,
        names=range(n_fields + 1),
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        quoting=csv.QUOTE_NONE,
        engine="c",
    )
    short = raw.isna().any(axis=1).to_numpy()
    if short.any():
        i = int(np.argmax(short))
        got = int(raw.iloc[i].notna().sum()) - 1
        raise FeatureError(
            f"ipinyou: {path} line {i + 1}: expected {n_fields} features after the label, got {got}"
        )
    label = binary_label(raw[0], "ipinyou", path, first_data_line=1)

    tokens = raw.iloc[:, 1:].to_numpy(dtype=str).ravel()
    idx_str, colon, one = np.char.partition(tokens, ":").T
    bad = (colon != ":") | (one != "1") | ~np.char.isdigit(idx_str)
    if bad.any():
        k = int(np.argmax(bad))
        raise FeatureError(
            f"ipinyou: {path} line {k // n_fields + 1}, token {k % n_fields + 1}: "
            f"expected 'index:1', got {tokens[k]!r}"
        )
    idx = idx_str.astype(np.int64).reshape(-1, n_fields)
    unknown = (idx >= len(fid)) | (fid[np.minimum(idx, len(fid) - 1)] < 0)
    if unknown.any():
        r, c = np.argwhere(unknown)[0]
        raise FeatureError(
            f"ipinyou: {path} line {r + 1}: feature index {idx[r, c]} is not in {folder / featindex}"
        )

    row_fid = fid[idx]
    order = np.argsort(row_fid, axis=1, kind="stable")  # columns by field, whatever order the line used
    row_fid = np.take_along_axis(row_fid, order, axis=1)
    ok = (row_fid == np.arange(n_fields)).all(axis=1)
    if not ok.all():
        r = int(np.argmax(~ok))
        seen = [fields[f] for f in row_fid[r]]
        raise FeatureError(
            f"ipinyou: {path} line {r + 1}: expected one feature per field {fields}, got fields {seen}"
        )
    values = val[np.take_along_axis(idx, order, axis=1)]

    df = pd.DataFrame({name: str_column(values[:, k]) for k, name in enumerate(fields)})
    df["clicked"] = label.to_numpy()
    return df
