"""MonitorStore: the PerformanceMonitor's state in SQLite (stdlib sqlite3, WAL journal).

One row per logged prediction (arrival order `seq`, optional request id, prediction, the baseline
model's prediction, the outcome once known); feature and segment values as one chunk per column
and logged batch (float64 bytes for numbers, a JSON list for categories: decoding runs no code),
so a window of one column is a range scan over few rows; and the history of drift checks (JSON). Every write is one transaction, so a process killed mid-stream loses at most the
call in flight: reopening the file gives the counts of every call that returned. WAL with
synchronous=NORMAL keeps committed transactions across a killed process (not across power loss;
pass synchronous="FULL" for that). One connection, guarded by a lock, serves all threads.
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY,          -- rowid: arrival order, from 1
    request_id TEXT UNIQUE,
    logged_at REAL NOT NULL,
    prediction REAL NOT NULL,
    baseline REAL,
    actual REAL
);
CREATE TABLE IF NOT EXISTS chunks (
    kind TEXT NOT NULL,               -- 'feature' | 'segment'
    name TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    numeric INTEGER NOT NULL,         -- 1: little-endian float64 bytes (NaN = missing); 0: JSON list
    data BLOB NOT NULL,
    PRIMARY KEY (kind, name, first_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS column_names (kind TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY,
    window INTEGER NOT NULL,
    checked_at REAL NOT NULL,
    drifted INTEGER NOT NULL,
    result TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
KINDS = ("feature", "segment")


class MonitorStore:
    """SQLite file (or ":memory:") holding logged predictions and drift checks."""

    def __init__(self, path: str | Path = ":memory:", synchronous: str = "NORMAL", timeout: float = 30.0) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"MonitorStore.synchronous: must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes
    def add(self, predictions: np.ndarray, actuals: Sequence[float | None], baselines: Sequence[float | None],
            request_ids: Sequence[str | None], columns: Mapping[str, Mapping[str, np.ndarray]] | None = None,
            ) -> tuple[int, int]:
        """Insert a batch in one transaction; return the (first, last) seq given to it.

        columns: {"feature": {name: values}, "segment": {name: values}}, each values array of the
        batch's length; float arrays are stored as numbers (NaN as missing), any other as strings.
        """
        now = time.time()
        rows = [(rid, now, float(p), b, a) for p, a, b, rid in zip(predictions, actuals, baselines, request_ids)]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                first = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM predictions").fetchone()[0]) + 1
                self._db.executemany(
                    "INSERT INTO predictions (request_id, logged_at, prediction, baseline, actual) VALUES (?, ?, ?, ?, ?)",
                    rows)
                for kind, cols in (columns or {}).items():
                    for name, values in cols.items():
                        self._db.execute("INSERT OR IGNORE INTO column_names (kind, name) VALUES (?, ?)", (kind, name))
                        numeric, data = _encode(values)
                        self._db.execute("INSERT INTO chunks (kind, name, first_seq, last_seq, numeric, data) "
                                         "VALUES (?, ?, ?, ?, ?, ?)", (kind, name, first, first + len(values) - 1,
                                                                       numeric, data))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as err:
                self._db.execute("ROLLBACK")
                raise ValueError(f"MonitorStore: a request_id of this batch was logged before ({err}); "
                                 f"request ids must be unique") from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return first, first + len(rows) - 1

    def set_outcomes(self, request_ids: Sequence[str], actuals: Sequence[float]) -> int:
        """Join outcomes to logged predictions by request id; return how many rows were updated."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for rid, a in zip(request_ids, actuals):
                    n += self._db.execute("UPDATE predictions SET actual = ? WHERE request_id = ?",
                                          (float(a), str(rid))).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def add_check(self, window: int, drifted: bool, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT INTO checks (window, checked_at, drifted, result) VALUES (?, ?, ?, ?)",
                             (int(window), time.time(), int(bool(drifted)), json.dumps(result, default=_json_default)))

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def clear(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for table in ("predictions", "chunks", "column_names", "checks", "meta"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[str, int]:
        with self._lock:
            n, labeled, last = self._db.execute(
                "SELECT COUNT(*), COUNT(actual), COALESCE(MAX(seq), 0) FROM predictions").fetchone()
            checks = self._db.execute("SELECT COUNT(*) FROM checks").fetchone()[0]
        return {"predictions": int(n), "labeled": int(labeled), "last_seq": int(last), "checks": int(checks)}

    def last_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM predictions").fetchone()[0])

    def rows(self, first: int, last: int) -> dict[str, Any]:
        """Predictions with first <= seq <= last, in seq order, as arrays (NaN where unknown)."""
        with self._lock:
            got = self._db.execute("SELECT seq, request_id, prediction, baseline, actual FROM predictions "
                                   "WHERE seq BETWEEN ? AND ? ORDER BY seq", (int(first), int(last))).fetchall()
        n = len(got)

        def floats(i: int) -> np.ndarray:
            return np.fromiter((np.nan if r[i] is None else r[i] for r in got), dtype=np.float64, count=n)

        return {"seq": np.fromiter((r[0] for r in got), dtype=np.int64, count=n), "request_id": [r[1] for r in got],
                "prediction": floats(2), "baseline": floats(3), "actual": floats(4)}

    def names(self, kind: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM column_names WHERE kind = ? ORDER BY name", (kind,))]

    def column(self, kind: str, name: str, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(numbers, categories) of one column for seq first..last: float array (NaN where absent or a
        category) and object array (None where absent or a number), aligned to seq."""
        first, last = int(first), int(last)
        n = max(last - first + 1, 0)
        num = np.full(n, np.nan)
        cat = np.full(n, None, dtype=object)
        with self._lock:
            got = self._db.execute("SELECT first_seq, last_seq, numeric, data FROM chunks WHERE kind = ? AND name = ? "
                                   "AND first_seq <= ? AND last_seq >= ?", (kind, name, last, first)).fetchall()
        for lo, hi, numeric, data in got:
            a, b = max(lo, first), min(hi, last)
            values = np.frombuffer(data, dtype="<f8") if numeric else json.loads(data)
            part = values[a - lo:b - lo + 1]
            if numeric:
                num[a - first:b - first + 1] = part
            else:
                cat[a - first:b - first + 1] = part
        return num, cat

    def checks(self) -> list[dict[str, Any]]:
        with self._lock:
            got = self._db.execute("SELECT window, checked_at, drifted, result FROM checks ORDER BY id").fetchall()
        return [{"window": w, "checked_at": t, "drifted": bool(d), **json.loads(r)} for w, t, d, r in got]

    def meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            got = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if got is None else json.loads(got[0])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _encode(values: np.ndarray) -> tuple[int, bytes]:
    if values.dtype.kind == "f":
        return 1, np.ascontiguousarray(values, dtype="<f8").tobytes()
    text = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values.tolist()]
    return 0, json.dumps(text, separators=(",", ":")).encode("utf-8")


__all__ = ["MonitorStore"]
