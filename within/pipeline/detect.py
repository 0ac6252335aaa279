"""The detection run behind detect.py: data -> AnomalyDetector -> anomalies, explanations, scores, plot.

Data kinds (conf/detect/data/*.yaml, key ``kind``):

* ``nab``: NAB series with labelled windows (``within.data.loaders.nab``). Each file is scored as
  one stream; settings given as fractions of NAB's probationary period ``P`` (``nab.relative``)
  become rows for that file, as NAB lets a detector know its warm-up length. Writes the alarms,
  the NAB scores of the three profiles at the configured threshold, and a plot.
* ``simulator``: ``within.data.performance.generate_performance`` on an ``AdMarketSimulator`` world;
  its labelled anomalies give event-level precision / recall / F1 and root-cause accuracy.
* ``csv``: any performance CSV (time, series, segment and metric columns).

Outputs in the run directory: ``anomalies.json`` (records + explanations), ``anomalies.csv``,
``metrics.json`` (NAB scores or event metrics when labels exist), ``detections.png``; the directory
is printed last.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from within.data.loaders import nab as nab_data
from within.models.anomaly import AnomalyDetector
from within.monitoring import nab
from within.pipeline.config import ConfigError

log = logging.getLogger(__name__)

DETECT_KEYS = {"task_name", "tags", "seed", "data", "detector", "paths", "extras", "plot_series"}
DATA_KINDS = ("nab", "simulator", "csv")
RELATIVE_KEYS = {"baseline", "min_history", "refresh", "refit_every", "cooldown"}
# NAB rows are scored as one series each: these detector settings are fixed by the data, not the user
NAB_FIXED = {"dimensions": ["value"], "series_columns": [], "time_column": "timestamp"}


# ------------------------------------------------------------------ config checks
def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def detector_params(node: Mapping[str, Any]) -> dict[str, Any]:
    """The detector group as AnomalyDetector keyword arguments (no _target_)."""
    params = {k: v for k, v in dict(node).items() if not str(k).startswith("_")}
    allowed = [p for p in inspect.signature(AnomalyDetector.__init__).parameters if p not in ("self", "alerts")]
    for key in params:
        if key not in allowed:
            raise ConfigError(f"detector.{key}: AnomalyDetector has no parameter '{key}'{_suggest(key, allowed)}")
    return params


def build_detector(params: Mapping[str, Any], where: str = "detector", **extra: Any) -> AnomalyDetector:
    """AnomalyDetector(**params, **extra); a bad value fails as a ConfigError naming `where.<key>`."""
    try:
        return AnomalyDetector(**{**params, **extra})
    except ValueError as err:
        msg = str(err)
        if msg.startswith("AnomalyDetector."):
            msg = f"{where}." + msg.removeprefix("AnomalyDetector.")
        raise ConfigError(msg) from None


def validate_detect_config(cfg: DictConfig) -> None:
    """Unknown keys, a bad data kind and bad detector settings fail here, before any data is read."""
    for key in cfg:
        if key != "hydra" and key not in DETECT_KEYS:
            raise ConfigError(f"config key '{key}' is unknown{_suggest(str(key), sorted(DETECT_KEYS))}")
    kind = cfg.data.get("kind")
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind: must be one of {list(DATA_KINDS)}, got {kind!r}")
    params = detector_params(_container(cfg.detector))
    if kind == "nab":
        rel = _container(cfg.data.get("relative") or {})
        bad = set(rel) - RELATIVE_KEYS
        if bad:
            raise ConfigError(f"data.relative.{min(bad)}: unknown; expected one of {sorted(RELATIVE_KEYS)}")
        for k, v in rel.items():
            if k == "baseline" and v == "expanding":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"data.relative.{k}: must be a positive fraction of the probationary period"
                                  f"{' or expanding' if k == 'baseline' else ''}, got {v!r}")
        overrides = _container(cfg.data.get("detector_overrides") or {}).get(params.get("detection_method"), {})
        params = {**params, **detector_params(overrides)}
        build_detector(params, **nab_relative(rel, 1000), **NAB_FIXED)
        cats = list(cfg.data.get("categories") or [])
        for c in cats:
            if c not in nab_data.FOLDERS:
                raise ConfigError(f"data.categories: {c!r} is not one of {sorted(nab_data.FOLDERS)}")
        if not cats:
            raise ConfigError("data.categories: name at least one NAB category, e.g. [realAdExchange]")
    else:
        build_detector({**params, **_container(cfg.data.get("detector_overrides") or {})})


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# ------------------------------------------------------------------ NAB
def nab_relative(relative: Mapping[str, Any], n_rows: int) -> dict[str, Any]:
    """Per-file detector settings (rows) from fractions of the probationary period of `n_rows` rows."""
    p = max(1, nab.probationary_length(n_rows))
    rel = dict(relative)
    out: dict[str, Any] = {}
    base = rel.get("baseline", "expanding")
    out["baseline_window"] = max(n_rows, 1) if base == "expanding" else max(3, round(float(base) * p))
    if "min_history" in rel:
        out["min_history"] = max(3, round(rel["min_history"] * p))
    if "refresh" in rel:
        out["refresh"] = max(1, round(rel["refresh"] * p))
    if "refit_every" in rel:
        out["refit_every"] = max(1, round(rel["refit_every"] * p))
    if "cooldown" in rel:
        out["cooldown"] = max(0, round(rel["cooldown"] * p))
    return out


def nab_files(series: Sequence[nab_data.NabSeries]) -> list[nab.ScoringFile]:
    return [nab.ScoringFile(s.name, len(s.frame), tuple(s.window_index())) for s in series]


def nab_detector(params: Mapping[str, Any], n_rows: int, relative: Mapping[str, Any]) -> AnomalyDetector:
    """The detector for one NAB file: `params`, the file's relative settings, one series of `value`."""
    return build_detector(params, **{**nab_relative(relative, n_rows), **NAB_FIXED})


def nab_z(series: Sequence[nab_data.NabSeries], params: Mapping[str, Any],
          relative: Mapping[str, Any]) -> tuple[list[np.ndarray], list[int]]:
    """Combined z per file (rows in file order, as NAB scores them) and each file's alarm cool-down."""
    zs, cooldowns = [], []
    for s in series:
        det = nab_detector(params, len(s.frame), relative)
        zs.append(det.score_series(s.frame[["value"]], s.frame["timestamp"])["z"])
        cooldowns.append(int(det.cooldown))
    return zs, cooldowns


def nab_flags(zs: Sequence[np.ndarray], cooldowns: Sequence[int], threshold: float) -> list[np.ndarray]:
    from within.monitoring.baseline import alarm_onsets

    return [alarm_onsets(z, threshold, cd) for z, cd in zip(zs, cooldowns)]


def nab_report(files: Sequence[nab.ScoringFile], flags: Sequence[np.ndarray], threshold: float) -> dict[str, Any]:
    """Raw and normalised NAB scores of fixed detections for every profile, with per-file rows."""
    out: dict[str, Any] = {}
    for profile in nab.PROFILES:
        rows = [nab.score_flags(f, fl, profile, threshold) for f, fl in zip(files, flags)]
        raw = float(sum(r.score for r in rows))
        out[profile] = {"raw": raw, "normalized": nab.normalized_score(raw, files, profile),
                        "files": [dataclasses.asdict(r) for r in rows]}
    return out


def optimize_nab_threshold(files: Sequence[nab.ScoringFile], zs: Sequence[np.ndarray], cooldowns: Sequence[int],
                           profile: str = "standard", candidates: Sequence[float] | None = None) -> tuple[float, float]:
    """NAB's per-detector threshold optimisation for alarm onsets with cool-downs: (|z| threshold, raw)."""
    from within.monitoring.baseline import alarm_onsets

    if candidates is None:
        candidates = np.unique(np.r_[np.linspace(1.5, 10, 35), np.linspace(10.5, 60, 34)])
    best_t, best_raw = math.inf, -math.inf
    for t in sorted(candidates, reverse=True):  # the highest threshold wins ties
        raw = sum(nab.score_flags(f, alarm_onsets(z, t, cd), profile).score for f, z, cd in zip(files, zs, cooldowns))
        if raw > best_raw:
            best_t, best_raw = float(t), float(raw)
    return best_t, best_raw


def plot_nab(s: nab_data.NabSeries, z: np.ndarray, flags: np.ndarray, threshold: float, path: Path,
             title: str = "") -> Path:
    """Value and |z| against time, with NAB's windows shaded and the alarms marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    t = s.frame["timestamp"]
    ax1.plot(t, s.frame["value"], lw=0.6, color="tab:blue")
    ax2.plot(t, np.abs(z), lw=0.6, color="tab:gray", label="|z| (combined)")
    ax2.axhline(threshold, color="tab:red", ls="--", lw=0.8, label=f"threshold {threshold:.2f}")
    for lo, hi in s.windows:
        for ax in (ax1, ax2):
            ax.axvspan(lo, hi, color="tab:orange", alpha=0.2)
    p = nab.probationary_length(len(t))
    ax1.axvspan(t.iloc[0], t.iloc[min(p, len(t) - 1)], color="0.85", alpha=0.5, label="probation")
    hits = np.flatnonzero(flags)
    ax1.scatter(t.iloc[hits], s.frame["value"].iloc[hits], color="tab:red", zorder=3, s=18, label="alarm")
    ax1.set_title(title or s.name, fontsize=9)
    ax1.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper left", fontsize=7)
    ax2.set_ylim(0, max(threshold * 3, 1.0))
    return _save(fig, path)


def run_nab(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    data = cfg.data
    params = detector_params(_container(cfg.detector))
    overrides = _container(data.get("detector_overrides") or {}).get(params.get("detection_method"), {})
    params = {**params, **overrides}
    relative = _container(data.get("relative") or {})
    series = nab_data.load_corpus(list(data.categories), data.root, bool(data.get("download", False)))
    files = nab_files(series)
    zs, cooldowns = nab_z(series, params, relative)
    threshold = build_detector(params, **NAB_FIXED).threshold
    flags = nab_flags(zs, cooldowns, threshold)
    alarms = [{"series": s.name, "timestamp": s.frame["timestamp"].iloc[i].isoformat(), "row": int(i),
               "z": float(z[i]), "score": float(1 - 2 * _norm_sf(abs(z[i])))}
              for s, z, fl in zip(series, zs, flags) for i in np.flatnonzero(fl)]
    metrics = {"threshold_z": threshold, "sensitivity": params.get("sensitivity"),
               "nab": nab_report(files, flags, threshold)}
    _write_json(out_dir / "anomalies.json", alarms)
    pd.DataFrame(alarms).to_csv(out_dir / "anomalies.csv", index=False)
    _write_json(out_dir / "metrics.json", metrics)
    pick = cfg.get("plot_series")
    k = next((i for i, s in enumerate(series) if s.name == pick), 0)
    plot_nab(series[k], zs[k], flags[k], threshold, out_dir / "detections.png")
    std = metrics["nab"]["standard"]
    log.info("NAB standard profile: raw %.3f, normalised %.1f over %d files", std["raw"], std["normalized"], len(files))
    return metrics


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ------------------------------------------------------------------ performance frames
def load_performance(data: DictConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(performance frame, labelled anomalies or None) for data.kind simulator | csv."""
    if data.kind == "simulator":
        from within.data.performance import generate_performance
        from within.data.simulator import AdMarketSimulator

        sim = AdMarketSimulator(**_container(data.get("world") or {}))
        return generate_performance(sim, **_container(data.get("performance") or {}))
    path = Path(str(data.path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    frame = pd.read_csv(path)
    labels = data.get("labels")
    truth = None
    if labels:
        lpath = Path(str(labels)).expanduser()
        if not lpath.is_file():
            raise FileNotFoundError(f"data.labels: {lpath} does not exist")
        truth = pd.read_csv(lpath, parse_dates=["start", "end"])
    return frame, truth


def plot_series(frame: pd.DataFrame, det: AnomalyDetector, anomalies: Sequence[Mapping[str, Any]], path: Path,
                truth: pd.DataFrame | None = None) -> Path:
    """The series with the most anomalies: its main dimension over time, detections and labels shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    if anomalies:
        counts = pd.Series([a["subject"] for a in anomalies]).value_counts()
        subject = counts.index[0]
        recs = [a for a in anomalies if a["subject"] == subject]
        dim = recs[0]["dimension"]
        series = recs[0]["series"]
    else:
        subject, recs, dim = "all", [], (det.dimensions or [c for c in frame.columns if c != det.time_column])[0]
        series = {}
    sel = frame
    for c, v in series.items():
        sel = sel[sel[c].astype(str) == str(v)]
    agg = det.aggregate(sel) if len(sel) else sel
    ax.plot(agg[det.time_column], agg[dim], lw=0.9, label=dim)
    for a in recs:
        ax.axvspan(a["start"], a["end"] + pd.Timedelta(hours=12), color="tab:red", alpha=0.3)
    if truth is not None and det.series_columns:
        key = det.series_columns[0]
        for row in truth[truth[key].astype(str) == str(series.get(key))].itertuples():
            ax.axvspan(row.start, row.end, color="tab:green", alpha=0.15)
    ax.set_title(f"{subject}: {dim} (red: detected, green: labelled)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_frame(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from within.monitoring.alerts import AlertRouter, JsonlSink
    from within.monitoring.events import match_events

    params = {**detector_params(_container(cfg.detector)), **_container(cfg.data.get("detector_overrides") or {})}
    frame, truth = load_performance(cfg.data)
    router = AlertRouter([JsonlSink(out_dir / "alerts.jsonl")], dedupe_seconds=0)
    det = build_detector(params)
    det.alerts = router
    anomalies = det.detect_anomalies(frame)
    explained = [{**a, "explanation": det.explain_anomaly(a["id"])} for a in anomalies]
    _write_json(out_dir / "anomalies.json", explained)
    flat = [{k: v for k, v in a.items() if k not in ("series", "dimensions")} | {"dimensions": json.dumps(a["dimensions"])}
            | {"root_cause": json.dumps(e["explanation"]["root_cause"], default=str)} for a, e in zip(anomalies, explained)]
    pd.DataFrame(flat).to_csv(out_dir / "anomalies.csv", index=False)
    metrics: dict[str, Any] = {"anomalies": len(anomalies), "threshold_z": det.threshold}
    if truth is not None:
        key = det.series_columns[0] if det.series_columns else "account_id"
        segs = [c for c in ("campaign_id", "state", "device") if c in truth.columns]
        m = match_events(anomalies, truth, series_column=key, segment_columns=segs, explain=det.explain_anomaly)
        metrics["events"] = {k: v for k, v in m.items() if k != "root_causes"}
        metrics["root_causes"] = m.get("root_causes", [])
        truth.to_csv(out_dir / "labelled_anomalies.csv", index=False)
    _write_json(out_dir / "metrics.json", metrics)
    plot_series(frame, det, anomalies, out_dir / "detections.png", truth)
    return metrics


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, pd.Timestamp):
        return obj.isoformat()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def run_detect(cfg: DictConfig) -> dict[str, Any]:
    """Validate, detect, write outputs; print the run directory last."""
    from within.pipeline.config import register_resolvers

    register_resolvers()
    validate_detect_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.extras.get("print_config"):
        from within.pipeline.console import print_config

        print_config(cfg)
    metrics = run_nab(cfg, out_dir) if cfg.data.kind == "nab" else run_frame(cfg, out_dir)
    print(json.dumps(metrics.get("events") or {p: round(v["normalized"], 2) for p, v in metrics.get("nab", {}).items()},
                     indent=2, default=str))
    print(out_dir)
    return metrics


__all__ = ["build_detector", "detector_params", "nab_detector", "nab_files", "nab_flags", "nab_relative",
           "nab_report", "nab_z", "optimize_nab_threshold", "plot_nab", "plot_series", "run_detect",
           "validate_detect_config"]
