"""Root cause of an anomaly: which segments (campaign, region, device, ...) hold its deviation.

Given the segment-level rows of one series, an anomaly window and the baseline rows before it, each
segment ``v`` of a column ``D`` gets an expected and an observed value of the anomalous metric over
the window, and its deviation ``dev_v = observed_v - expected_v``:

* additive metrics (impressions, clicks, spend, ...): ``expected_v`` sums, over the window's periods,
  the segment's mean per period over the baseline periods of the same seasonal phase (same day of
  week, say; all baseline periods when none shares it), so a weekend does not look like an anomaly;
* ratio metrics ``num / den`` (ctr = clicks / impressions, ...): the deviation is counted in the
  numerator at the window's own denominators: ``expected_v = sum_t den_v(t) * rate_v(phase(t))``
  with the segment's baseline rate at that phase. A CTR drop in one device then shows as that
  device's missing clicks.

The baseline is the rows before the anomaly started, so an anomaly that lasts does not become its own
reference.

Deviations add up over segments, so ``dev_v / sum(dev)`` is the share of the anomaly that segment
explains. A column LOCALISES the anomaly when a small set ``S`` of its values (greedily, by deviation
in the anomaly's direction, at most ``max_values`` of them and less than ``max_share`` of the expected
volume) changed while the rest did not: ``S`` explains at least ``min_explained`` of the deviation and
the relative change outside ``S`` is at most ``rest_ratio`` times the relative change inside it.
Otherwise the anomaly is spread along that column (all its segments moved alike). The root cause is the localised columns' sets, minus any column implied by
another localised one (a campaign targets one country, so "country" adds nothing to "campaign").
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

RATIOS = {
    "ctr": ("clicks", "impressions", 1.0),
    "cvr": ("conversions", "clicks", 1.0),
    "cpc": ("spend", "clicks", 1.0),
    "cpm": ("spend", "impressions", 1000.0),
    "cpa": ("spend", "conversions", 1.0),
    "roas": ("revenue", "spend", 1.0),
}


def components(metric: str, columns: Sequence[str]) -> tuple[str, str, float] | None:
    """(numerator, denominator, scale) when `metric` is a known ratio whose parts are in `columns`."""
    parts = RATIOS.get(metric)
    return parts if parts is not None and parts[0] in columns and parts[1] in columns else None


def _phase(frame: pd.DataFrame, phase: str | None) -> pd.Series:
    return frame[phase] if phase else pd.Series(0, index=frame.index)


def _expected_count(window: pd.DataFrame, baseline: pd.DataFrame, column: str, metric: str,
                    time_column: str, phase: str | None) -> pd.Series:
    """Per segment: sum over the window's periods of its mean per baseline period at that phase."""
    ph_b, ph_w = _phase(baseline, phase), _phase(window, phase)
    periods = baseline[time_column].groupby(ph_b).nunique()
    per_phase = baseline[metric].groupby([baseline[column], ph_b], observed=True).sum()
    per_phase = per_phase / periods.reindex(per_phase.index.get_level_values(1)).to_numpy()
    overall = baseline[metric].groupby(baseline[column], observed=True).sum() / max(baseline[time_column].nunique(), 1)
    counts = window.drop_duplicates(time_column).assign(ph=ph_w)["ph"].value_counts()
    out = pd.Series(0.0, index=overall.index)
    for ph, n in counts.items():
        at = per_phase.xs(ph, level=1) if ph in periods.index else overall
        out = out.add(at.reindex(out.index).fillna(0.0) * n, fill_value=0.0)
    return out


def _expected_ratio(window: pd.DataFrame, baseline: pd.DataFrame, column: str, num: str, den: str,
                    phase: str | None) -> pd.Series:
    """Per segment: sum over the window's rows of den * the segment's baseline num/den at that phase."""
    ph_b, ph_w = _phase(baseline, phase), _phase(window, phase)
    sums = baseline[[num, den]].groupby([baseline[column], ph_b], observed=True).sum()
    rate = (sums[num] / sums[den].where(sums[den] > 0)).rename("rate")
    tot = baseline[[num, den]].groupby(baseline[column], observed=True).sum()
    rate_all = (tot[num] / tot[den].where(tot[den] > 0)).rename("rate_all")
    overall = baseline[num].sum() / baseline[den].sum() if baseline[den].sum() > 0 else 0.0
    w = pd.DataFrame({"seg": window[column].to_numpy(), "ph": ph_w.to_numpy(), "den": window[den].to_numpy()})
    w = w.join(rate, on=["seg", "ph"]).join(rate_all, on="seg")
    r = w["rate"].fillna(w["rate_all"]).fillna(overall)
    return (w["den"] * r).groupby(w["seg"]).sum()


def segment_table(window: pd.DataFrame, baseline: pd.DataFrame, column: str, metric: str,
                  time_column: str, phase: str | None = None) -> pd.DataFrame:
    """Per value of `column`: expected, observed, deviation, share_of_deviation, relative_change,
    traffic_share (its share of the expected metric). `phase` names a column holding each row's
    seasonal phase (e.g. day of week), so a segment is compared with its own baseline at that phase."""
    parts = components(metric, list(window.columns))
    if parts is not None:
        num, den, _ = parts
        expected = _expected_ratio(window, baseline, column, num, den, phase)
        observed = window.groupby(column, observed=True)[num].sum()
    else:
        expected = _expected_count(window, baseline, column, metric, time_column, phase)
        observed = window.groupby(column, observed=True)[metric].sum()
    keys = observed.index.union(expected.index)
    expected = expected.reindex(keys, fill_value=0.0).to_numpy(dtype=np.float64)
    observed = observed.reindex(keys, fill_value=0.0).to_numpy(dtype=np.float64)
    dev = observed - expected
    total = dev.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(expected != 0, dev / expected, 0.0)
    exp_sum = expected.sum()
    return pd.DataFrame({
        "value": [str(k) for k in keys], "expected": expected, "observed": observed, "deviation": dev,
        "share_of_deviation": dev / total if total != 0 else np.zeros(len(keys)),
        "relative_change": rel, "traffic_share": expected / exp_sum if exp_sum else np.zeros(len(keys)),
    })


def localise(table: pd.DataFrame, direction: float, max_values: int = 3, max_share: float = 0.8,
             rest_ratio: float = 0.35, min_explained: float = 0.8) -> list[str] | None:
    """The few values of one column that hold the deviation, or None when it is spread over them all."""
    order = table.assign(d=direction * table["deviation"]).sort_values("d", ascending=False)
    order = order[order["d"] > 0]
    exp_all, dev_all = table["expected"].sum(), table["deviation"].sum()
    if exp_all == 0 or direction * dev_all <= 0:
        return None
    chosen, exp_in, dev_in = [], 0.0, 0.0
    for row in order.head(max_values).itertuples():
        chosen.append(row.value)
        exp_in += row.expected
        dev_in += row.deviation
        if exp_in / exp_all >= max_share:
            return None
        exp_out, dev_out = exp_all - exp_in, dev_all - dev_in
        rel_in = dev_in / exp_in if exp_in else np.inf
        rel_out = dev_out / exp_out if exp_out else 0.0
        if dev_in / dev_all >= min_explained and direction * rel_out <= rest_ratio * abs(rel_in):
            return chosen
    return None


def implied(rows: pd.DataFrame, by: str, values: Sequence[str], column: str, targets: Sequence[str],
            weight: str | None = None, coverage: float = 0.95) -> bool:
    """Whether rows with `by` in `values` lie (>= `coverage` of their weight) in `column` in `targets`."""
    sel = rows[rows[by].astype(str).isin(list(values))]
    if sel.empty:
        return False
    w = sel[weight].to_numpy(dtype=np.float64) if weight and weight in sel else np.ones(len(sel))
    inside = sel[column].astype(str).isin(list(targets)).to_numpy()
    return w.sum() > 0 and w[inside].sum() / w.sum() >= coverage


def explain(window: pd.DataFrame, baseline: pd.DataFrame, segment_columns: Sequence[str], metric: str,
            direction: float, time_column: str, phase: str | None = None, top: int = 5, **localise_kw) -> dict:
    """Drill-down of one metric over every segment column: tables, localised sets and the root cause."""
    tables, local = {}, {}
    for col in segment_columns:
        table = segment_table(window, baseline, col, metric, time_column, phase)
        tables[col] = table
        found = localise(table, direction, **localise_kw)
        if found is not None:
            local[col] = found
    parts = components(metric, list(window.columns))
    weight = parts[1] if parts else (metric if metric in window else None)
    both = pd.concat([baseline, window])
    cause = dict(local)
    for col, values in list(local.items()):  # drop a column implied by another localised one
        for other, other_values in local.items():
            if other == col or other not in cause or col not in cause:
                continue
            if implied(both, other, other_values, col, values, weight):
                mutual = implied(both, col, values, other, other_values, weight)  # earlier columns win ties
                if not mutual or list(segment_columns).index(other) < list(segment_columns).index(col):
                    cause.pop(col)
    root = {col: (vals[0] if len(vals) == 1 else vals) for col, vals in cause.items()}
    segments = {
        col: t.assign(d=direction * t["deviation"]).sort_values("d", ascending=False).drop(columns="d")
        .head(top).to_dict(orient="records")
        for col, t in tables.items()
    }
    return {"metric": metric, "root_cause": root, "localised": local, "segments": segments}


__all__ = ["RATIOS", "components", "explain", "implied", "localise", "segment_table"]
