"""Shared plumbing for the dataset loaders: locating files, optional checksummed download, dtype helpers."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from within.features.spec import FeatureError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its local name, where to fetch it, and the SHA-256 it must have.

    `fix` rewrites the downloaded bytes before the checksum (e.g. to drop a stray first line),
    so the pinned checksum is that of the exact file the loader parses.
    """

    name: str
    url: str
    sha256: str
    fix: Callable[[bytes], bytes] | None = None


def cache_dir(dataset: str) -> Path:
    """`$WITHIN_CACHE_DIR/<dataset>`, default `~/.cache/within/<dataset>`."""
    base = os.environ.get("WITHIN_CACHE_DIR") or "~/.cache/within"
    return Path(base).expanduser() / dataset


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def not_found(dataset: str, path: Path, can_download: bool) -> FileNotFoundError:
    fetch = (
        f"set download=true (data.source.download=true) to fetch it into {cache_dir(dataset)}, or "
        if can_download
        else ""
    )
    return FileNotFoundError(
        f"{dataset}: expected data file {path} but it does not exist; {fetch}"
        f"point paths.data_dir=... (or data.source.root=...) at the folder that holds it"
    )


def download(remote: RemoteFile, dest_dir: Path) -> Path:
    """Fetch `remote` into `dest_dir` atomically; raise if its SHA-256 differs from the pinned one."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / remote.name
    log.info("downloading %s -> %s", remote.url, dest)
    with urllib.request.urlopen(remote.url, timeout=60) as resp:  # URLs are pinned constants
        data = resp.read()
    if remote.fix is not None:
        data = remote.fix(data)
    got = hashlib.sha256(data).hexdigest()
    if got != remote.sha256:
        raise OSError(
            f"checksum mismatch for {remote.url}: expected sha256 {remote.sha256}, got {got}; the remote "
            f"file changed or the download was corrupted. Nothing was written to {dest}"
        )
    with tempfile.NamedTemporaryFile(dir=dest_dir, delete=False) as tmp:
        tmp.write(data)
    shutil.move(tmp.name, dest)
    return dest


def locate_file(dataset: str, root: str | Path | None, files: Sequence[RemoteFile], file: str, download: bool) -> Path:
    """Path of one dataset file: a known file may be downloaded; any other name must already be in `root`."""
    remote = [f for f in files if f.name == file] or [RemoteFile(file, "", "")]
    return locate(dataset, root, remote, download and remote[0].url != "") / file


def locate(dataset: str, root: str | Path | None, files: Sequence[RemoteFile], download_ok: bool) -> Path:
    """Return the folder holding every file in `files`.

    `root` wins when it has them all. Otherwise, with `download_ok`, the cache is used: files are
    fetched (or re-fetched when the cached copy's checksum is wrong). Otherwise FileNotFoundError.
    """
    if root is not None:
        root = Path(root).expanduser()
        missing = [root / f.name for f in files if not (root / f.name).is_file()]
        if not missing:
            return root
    else:
        missing = [Path("<data.source.root unset>") / f.name for f in files]
    if not download_ok:
        raise not_found(dataset, missing[0], can_download=True)
    cdir = cache_dir(dataset)
    for f in files:
        cached = cdir / f.name
        if cached.is_file() and sha256_file(cached) == f.sha256:
            continue
        download(f, cdir)
    return cdir


def str_column(values: pd.Series | np.ndarray) -> pd.Series:
    """Strings with missing values kept as NaN (pandas<3 `astype(str)` would write 'nan')."""
    s = pd.Series(values)
    missing = s.isna()
    out = s.astype(str)
    if missing.any():
        out = out.where(~missing, np.nan)
    return out


def binary_label(raw: pd.Series, dataset: str, path: Path, first_data_line: int) -> pd.Series:
    """Parse a 0/1 label column read as strings; name the file line of the first bad value."""
    text = raw.astype(str).str.strip()
    bad = ~text.isin(["0", "1"]).to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise FeatureError(
            f"{dataset}: {path} line {i + first_data_line}: label must be 0 or 1, got {raw.iloc[i]!r}"
        )
    return (text == "1").astype(np.int64)
