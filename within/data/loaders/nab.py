"""NAB (Numenta Anomaly Benchmark) series with their labelled anomaly windows.

Each NAB file is a `timestamp,value` CSV; the labels are two JSON files covering every NAB series,
keyed `<category>/<file>`: `combined_windows.json` (a list of `[start, end]` windows per series; a
detection inside a window is a true positive) and `combined_labels.json` (the labelled anomaly
timestamps, one inside each window). `config/profiles.json` holds the scoring weights.

Layout under the data root (`../shared/data` by default; see the PROVENANCE.md files there):

    nab_realAdExchange/<file>.csv                          realAdExchange (6 series)
    nab_realAdExchange/labels/{combined_windows,combined_labels,profiles}.json
    nab_realKnownCause_realTraffic/realKnownCause/<file>.csv
    nab_realKnownCause_realTraffic/realTraffic/<file>.csv

With `download=True` a missing file is fetched from NAB at commit ea702d75 into the same layout under
`$WITHIN_CACHE_DIR/nab` and checked against its SHA-256 (the checksums are those of the shared copies,
which match the files at that commit; the download itself was not re-run online).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from within.data.loaders._common import RemoteFile, cache_dir, locate, not_found
from within.features.spec import FeatureError

COMMIT = "ea702d75cc2258d9d7dd35ca8e5e2539d71f3140"
_RAW = f"https://raw.githubusercontent.com/numenta/NAB/{COMMIT}"

FOLDERS = {
    "realAdExchange": "nab_realAdExchange",
    "realKnownCause": "nab_realKnownCause_realTraffic/realKnownCause",
    "realTraffic": "nab_realKnownCause_realTraffic/realTraffic",
}
LABELS_FOLDER = "nab_realAdExchange/labels"

# sha256 of each file at COMMIT
_SHA = {
    "realAdExchange": {
        "exchange-2_cpc_results.csv": "d869ab165254f3ee77ee21fd9fab2be1d07c1f80b8133cf01bbaf2d768c2ac64",
        "exchange-2_cpm_results.csv": "1f01b9438566d2fe1ac446faa202a395ac86db9240a1955bc1f118c8eada2a19",
        "exchange-3_cpc_results.csv": "e70b24dba107a2589657cb3feb9ca5605b4f3f7de49ff445f32f5991bc0bdbe5",
        "exchange-3_cpm_results.csv": "74d354a94fb1730e14b469c7c1c6e99c2ad69af53afdb85f65220bd3cf01ce4a",
        "exchange-4_cpc_results.csv": "d4c13abd6f28594dc446f22106562ebe917fdbe76170f60a500c2a402ecc09e2",
        "exchange-4_cpm_results.csv": "4e5c955b632145b77b93fba4a5e3bf615d47e00416e17091d64e05ae109c760e",
    },
    "realKnownCause": {
        "ambient_temperature_system_failure.csv": "230b68ccca20f59d562afd5d24ad52939c9b784386bed0054018358bf9120581",
        "cpu_utilization_asg_misconfiguration.csv": "58ba65dc0737cfbac11b51514476d50c438d44011232144bb8d93f392df58f9f",
        "ec2_request_latency_system_failure.csv": "98378580aa80157e057c61d59d81daddccc6c65a2c0c800e3f01f603b8215c3f",
        "machine_temperature_system_failure.csv": "92bf5b87fc7f9bba8ca0b7ec63ccaac8cb4a1371a258e8c29a10ae9c018d82a4",
        "nyc_taxi.csv": "d8fa6f7f0734bf5c8be12c52a94e20a82664c397d9dec4449156bd453d32856d",
        "rogue_agent_key_hold.csv": "47b110baa8e3636574c1033dda1cce780873647fab58223d159d4fee6f180e86",
        "rogue_agent_key_updown.csv": "9797cfef477c13306f7a33874ab4d6cf700f8f2c7e5825a2a5bc02004370909a",
    },
    "realTraffic": {
        "TravelTime_387.csv": "38e70e9ead8227fd023bff6e93247d5bc01ee008f781b921a156962419b399bb",
        "TravelTime_451.csv": "7c174adfc457b201cd111d60688f7ec37eb7201c8080790dc41eeff477bd7345",
        "occupancy_6005.csv": "cd357d7820d675074270fd976d4af1fc1e7854ecb764783028cbcb18d980c91d",
        "occupancy_t4013.csv": "5663a8122a300360eb51fbbd0f21706da05af1af55262926d6a226bb6d071704",
        "speed_6005.csv": "7976e7596cd1e579696c737576e96a26fe041484472ed7d0a463ce2b094d7aa7",
        "speed_7578.csv": "15ba994384730cb5a2e6818f17ded1430b40d92eb7a08e5b1a48a445c8c350f6",
        "speed_t4013.csv": "fa5532d6f7db36cadc73e657fd4dfef05cb1ec44d4010243b314d3f1bbd6a7b5",
    },
}
_LABEL_SHA = {
    "combined_windows.json": "1e1fbc4601321aad8d0f8b3784c8134299379f68f6c1f7777565f8ffd57ab6b1",
    "combined_labels.json": "98724014c162fcfd4be605683517f194051a54e98756c53667bd33ddbc644d9b",
    "profiles.json": "fc018b9a29ae900ab22de167baf06c36f2be528a5a3a1406d6775e238aeb9565",
}


def _label_files() -> list[RemoteFile]:
    where = {"combined_windows.json": "labels", "combined_labels.json": "labels", "profiles.json": "config"}
    return [RemoteFile(name, f"{_RAW}/{where[name]}/{name}", sha) for name, sha in _LABEL_SHA.items()]


@dataclasses.dataclass(frozen=True)
class NabSeries:
    """One NAB file: `frame` has `timestamp` (datetime64), `value` (float) and `in_window` (bool)."""

    name: str  # "<category>/<file>", NAB's key for the series
    frame: pd.DataFrame
    windows: tuple[tuple[pd.Timestamp, pd.Timestamp], ...]
    labels: tuple[pd.Timestamp, ...]

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]

    def window_index(self) -> list[tuple[int, int]]:
        """Each window as (first row, last row), both inclusive: the rows whose timestamps equal its limits.

        By row, as NAB scores: a few NAB files have a timestamp that steps back (a clock reset), so rows
        are kept in file order and never sorted.
        """
        return [_row_bounds(self.frame["timestamp"], self.name, lo, hi) for lo, hi in self.windows]


def _row_bounds(ts: pd.Series, name: str, lo: pd.Timestamp, hi: pd.Timestamp) -> tuple[int, int]:
    first, last = np.flatnonzero((ts == lo).to_numpy()), np.flatnonzero((ts == hi).to_numpy())
    if not len(first) or not len(last):
        raise FeatureError(f"nab: {name}: window [{lo}, {hi}] does not start and end on timestamps of the series")
    return int(first[0]), int(last[0])


def files(category: str) -> list[str]:
    """The series names of one NAB category, e.g. files("realAdExchange")."""
    _check_category(category)
    return [f"{category}/{name}" for name in sorted(_SHA[category])]


def _check_category(category: str) -> None:
    if category not in FOLDERS:
        raise FeatureError(f"nab: category {category!r} is not one of {sorted(FOLDERS)}")


def _folder(root: str | Path | None, rel: str, remotes: Sequence[RemoteFile], download: bool) -> Path:
    """The folder holding `remotes`: under `root`, else in the cache, else downloaded (if allowed)."""
    bases = ([Path(root).expanduser() / rel] if root is not None else []) + [cache_dir("nab") / rel]
    for base in bases:
        if all((base / f.name).is_file() for f in remotes):
            return base
    if not download:
        missing = next(bases[0] / f.name for f in remotes if not (bases[0] / f.name).is_file())
        raise not_found("nab", missing, can_download=True)
    return locate(f"nab/{rel}", None, remotes, True)  # cache_dir("nab/<rel>") == cache_dir("nab") / rel


def read_labels(root: str | Path | None, download: bool = False) -> tuple[dict, dict, dict]:
    """(windows, labels, profiles) JSON of the whole NAB corpus."""
    remotes = _label_files()
    folder = _folder(root, LABELS_FOLDER, remotes, download)
    return tuple(json.loads((folder / f.name).read_text()) for f in remotes)  # type: ignore[return-value]


def load_series(name: str, root: str | Path | None, download: bool = False,
                labels: tuple[dict, dict, dict] | None = None) -> NabSeries:
    """One NAB series by its key, e.g. load_series("realAdExchange/exchange-2_cpc_results.csv", data_dir)."""
    category, _, file = name.partition("/")
    _check_category(category)
    if file not in _SHA[category]:
        raise FeatureError(f"nab: {name!r} is not a {category} file; known: {sorted(_SHA[category])}")
    remote = RemoteFile(file, f"{_RAW}/data/{category}/{file}", _SHA[category][file])
    path = _folder(root, FOLDERS[category], [remote], download) / file
    raw = pd.read_csv(path)
    if list(raw.columns) != ["timestamp", "value"]:
        raise FeatureError(f"nab: {path}: expected columns ['timestamp', 'value'], got {list(raw.columns)}")
    frame = pd.DataFrame({"timestamp": pd.to_datetime(raw["timestamp"]),
                          "value": pd.to_numeric(raw["value"], errors="raise").astype(np.float64)})
    windows_json, labels_json, _ = labels if labels is not None else read_labels(root, download)
    if name not in windows_json:
        raise FeatureError(f"nab: {name!r} has no entry in combined_windows.json")
    windows = tuple((pd.Timestamp(lo), pd.Timestamp(hi)) for lo, hi in windows_json[name])
    in_window = np.zeros(len(frame), dtype=bool)
    for lo, hi in windows:
        first, last = _row_bounds(frame["timestamp"], name, lo, hi)
        in_window[first:last + 1] = True
    frame["in_window"] = in_window
    return NabSeries(name, frame, windows, tuple(pd.Timestamp(t) for t in labels_json.get(name, [])))


def load_corpus(categories: Sequence[str], root: str | Path | None, download: bool = False) -> list[NabSeries]:
    """Every series of the given categories, in name order."""
    labels = read_labels(root, download)
    return [load_series(name, root, download, labels) for c in categories for name in files(c)]


def load(root: str | Path | None, download: bool = False,
         categories: Sequence[str] = ("realAdExchange",)) -> pd.DataFrame:
    """The series of `categories` stacked in one frame with a `series` column (the NAB key)."""
    parts = [s.frame.assign(series=s.name) for s in load_corpus(categories, root, download)]
    return pd.concat(parts, ignore_index=True)


__all__ = ["FOLDERS", "NabSeries", "files", "load", "load_corpus", "load_series", "read_labels"]
