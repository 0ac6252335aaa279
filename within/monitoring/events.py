"""Event-level scoring of detected anomalies against labelled ones (the simulator's anomalies table).

A detected anomaly MATCHES a labelled one of the same series when their periods overlap, the
labelled period extended by ``tolerance`` after its end (an anomaly's end is a change too: a series
returning to normal after a level shift is part of the same incident). Several detections of one
labelled anomaly count once for recall, and every one of them is a true positive for precision
(they are not false alarms). Precision = matched detections / detections; recall = labelled anomalies
with a match / labelled anomalies; F1 their harmonic mean (0 when both are 0).

Root-cause accuracy: over the labelled anomalies that were found, the share whose FIRST matching
detection's explanation names exactly the true segment (the same columns with the same values; the
empty segment for an anomaly of the whole series).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd


def _segment(row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, str]:
    return {c: str(row[c]) for c in columns if row.get(c) is not None and not pd.isna(row.get(c))}


def _normalise(cause: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in cause.items():
        if isinstance(v, (list, tuple)):
            v = v[0] if len(v) == 1 else ",".join(sorted(map(str, v)))
        out[str(k)] = str(v)
    return out


def match_events(detected: Sequence[Mapping[str, Any]], truth: pd.DataFrame, series_column: str = "account_id",
                 segment_columns: Sequence[str] = ("campaign_id", "state", "device"),
                 tolerance: pd.Timedelta | str = "3D",
                 explain: Callable[[str], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Precision, recall, F1 and root-cause accuracy of `detected` (AnomalyDetector records) against
    `truth` (one row per labelled anomaly: series_column, start, end and the segment columns)."""
    tol = pd.Timedelta(tolerance)
    truth = truth.reset_index(drop=True)
    found: dict[int, Mapping[str, Any]] = {}
    tp = 0
    for rec in sorted(detected, key=lambda r: pd.Timestamp(r["start"])):
        series = str(rec["series"][series_column])
        start, end = pd.Timestamp(rec["start"]), pd.Timestamp(rec["end"])
        hits = truth.index[(truth[series_column].astype(str) == series)
                           & (truth["start"] <= end) & (truth["end"] + tol >= start)]
        if len(hits):
            tp += 1
            for i in hits:
                found.setdefault(int(i), rec)
    n_det, n_true = len(detected), len(truth)
    precision = tp / n_det if n_det else 0.0
    recall = len(found) / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out: dict[str, Any] = {"detected": n_det, "labelled": n_true, "true_positives": tp, "found": len(found),
                           "precision": precision, "recall": recall, "f1": f1}
    if explain is not None:
        rows = []
        for i, rec in sorted(found.items()):
            want = _segment(truth.loc[i], segment_columns)
            got = _normalise(explain(rec["id"]).get("root_cause", {}))
            rows.append({"anomaly_id": truth.loc[i].get("anomaly_id", i), "true": want, "found": got,
                         "correct": want == got})
        out["root_cause_accuracy"] = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
        out["root_causes"] = rows
    return out


__all__ = ["match_events"]
