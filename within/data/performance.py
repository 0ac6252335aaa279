"""Daily (or hourly) ad-performance series of an `AdMarketSimulator` world, with labelled anomalies.

The series come from the SAME world as ``AdMarketSimulator(seed=...).sample(n)``: its accounts,
campaigns (budget, country), ad-group bids, traffic shares, states and city populations, devices and
the true click model. One row per ``(timestamp, account_id, campaign_id, state, device)`` cell (fewer
columns with ``breakdown=``), with counts ``impressions, clicks, conversions, spend`` and the ratios
``ctr = clicks / impressions``, ``cvr = conversions / clicks``, ``cpc = spend / clicks`` (0 when the
denominator is 0). ``generate_performance(sim)`` returns ``(series, anomalies)``.

Generating model
----------------
For cell ``k = (account a, campaign c, state s, device d)`` and period ``t`` (day, or hour with
``freq="h"``), with day of week ``w(t)`` and hour ``h(t)``::

    share_k      = traffic_c * pop_s * DEVICE_P[d]      # sim.ad_cum summed over c's ads; state's share of
                                                        # its country's city population; device mix
    logit ctr_k  = logit(ctr_c) + state_effect[s] - mean_c(state_effect)
                   + main_effect_scale * DEVICE_EFFECT[d]
                   + interaction_scale * sum_p PLACEMENT_P[p] * DEVICE_X_PLACEMENT[d, p]  (both centred
                   over devices)                        # ctr_c: mean true_ctr of c in a pilot draw
    cpc_k        = CPC_DISCOUNT * mean bid of c's ad groups * CPC_DEVICE[d]
    logit cvr_k  = logit(mean_cvr) + u_cvr[a] + CVR_DEVICE[d],   u_cvr ~ N(0, cvr_account_sd^2)

    mu_imp(k, t) = M * share_k * weekly(w) [* hourly(h) / 24] * exp(e_a(t) + e_c(t)) * A_imp(k, t)
    ctr(k, t)    = expit(logit ctr_k + seasonality_scale * (DOW_EFFECT[w] [+ hour_table[h]] - mean)
                         + n_a(t)) * A_ctr(k, t)
    cvr(k, t)    = expit(logit cvr_k + v_a(t)) * A_cvr(k, t)
    cpc(k, t)    = cpc_k * exp(q_a(t)) * A_cpc(k, t)

    impressions ~ Poisson(mu_imp);  clicks ~ Binomial(impressions, ctr)
    conversions ~ Binomial(clicks, cvr);  spend ~ Gamma(shape=SPEND_SHAPE * clicks, scale=cpc / SPEND_SHAPE)

* ``M`` (market impressions per day) is set so that expected spend equals ``utilisation`` times the
  summed campaign budgets. ``weekly`` is the simulator's traffic cycle (weekends x1.15), normalised to
  mean 1; ``hourly(h) = 1 + 0.6 cos(2 pi (h - 20) / 24)`` (the simulator's) normalised to mean 1.
* Natural variation: ``e_a`` account traffic noise, AR(1) with coefficient 0.6 and sd ``traffic_sd``;
  ``e_c`` campaign traffic noise ``N(0, traffic_sd^2)``; ``n_a, v_a, q_a`` account noise on the CTR
  logit, CVR logit and log CPC, sd ``ctr_sd, cvr_sd, cpc_sd``, independent per period.
* ``A_m(k, t)`` is 1 except inside an injected anomaly whose driver metric is ``m`` and whose segment
  contains ``k``: there it is ``1 + sign * e / share`` for spikes, drops and level shifts, and ramps
  linearly from 1 to that value over the anomaly for drifts. ``e`` is the anomaly's effect on the
  ACCOUNT's expected value of the metric (``effect``, drawn from ``effect_range``); ``share`` is the
  segment's share of the account (traffic for impressions, clicks for ctr and cpc, conversions for cvr),
  so a narrow segment moves more. A drop's segment must hold at least ``effect / 0.8`` of the account
  (multiplier >= 0.2); when no drawn segment qualifies, the anomaly hits the whole account.

Anomalies (the ``anomalies`` table, one row each): ``anomaly_id, kind (spike | drop | level_shift |
drift), start, end`` (inclusive; the effect is non-zero exactly on those periods), ``metric`` (the
driver: impressions | ctr | cvr | cpc), ``affected`` (the series it moves: the driver and the counts
built on it), ``direction`` (positive | negative), ``effect``, ``multiplier``, ``segment_share`` and
the true root-cause segment ``account_id, campaign_id, state, device`` (None = the whole account along
that column). Durations: spike 1-2 periods, drop 1-3, level shift 10-20, drift 12-24 (days; x24 hours
for ``freq="h"``). Each anomaly hits its own account (at most one per account), starts after
``warmup`` periods and ends before the series does. Segments are drawn from: the whole account, one
device, one campaign, one state, or one device in one state, redrawn until their share is at least
``min_share``.

Not modelled: the simulator's ``drift`` knob (calibration drift) and its placement/age/gender mix
beyond what the pilot draw's ``ctr_c`` averages over.

Determinism: the same ``(sim.seed, sim knobs, arguments)`` gives identical frames. Each part draws
from its own ``SeedSequence(seed, spawn_key=(11, part))`` stream.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from within.data.simulator import (
    DEVICE_EFFECT,
    DEVICE_P,
    DEVICE_X_PLACEMENT,
    DEVICES,
    DOW_EFFECT,
    PLACEMENT_P,
    AdMarketSimulator,
)

__all__ = ["COUNTS", "KINDS", "METRICS", "SEGMENT_COLUMNS", "PerformanceConfig", "generate_performance"]

SEGMENT_COLUMNS = ("campaign_id", "state", "device")
COUNTS = ("impressions", "clicks", "conversions", "spend")
METRICS = ("impressions", "ctr", "cvr", "cpc")  # anomaly drivers
KINDS = ("spike", "drop", "level_shift", "drift")
# the series a driver moves (the driver and the counts computed from it)
AFFECTED = {
    "impressions": ("impressions", "clicks", "conversions", "spend"),
    "ctr": ("ctr", "clicks", "conversions", "spend"),
    "cvr": ("cvr", "conversions"),
    "cpc": ("cpc", "spend"),
}
DURATION = {"spike": (1, 2), "drop": (1, 3), "level_shift": (10, 20), "drift": (12, 24)}
CPC_DISCOUNT = 0.7  # second-price auctions clear below the bid
CPC_DEVICE = (0.9, 1.12, 1.0)  # mobile, desktop, tablet
CVR_DEVICE = (-0.15, 0.20, 0.0)
SPEND_SHAPE = 4.0  # cost per click ~ Gamma(4, cpc / 4): CV 0.5 per click
WEEKEND_TRAFFIC = 1.15  # the simulator's weekend traffic factor
# root-cause segment kinds: the columns each one fixes, and how often each is drawn
SEGMENT_KINDS = {"account": (), "device": ("device",), "campaign": ("campaign_id",), "state": ("state",),
                 "device_state": ("device", "state")}
SEGMENT_P = {"account": 0.2, "device": 0.25, "campaign": 0.2, "state": 0.2, "device_state": 0.15}


@dataclasses.dataclass(frozen=True)
class PerformanceConfig:
    """Knobs of `generate_performance` (see the module docstring for what each one enters)."""

    days: int = 120
    freq: str = "D"  # "D" daily rows, "h" hourly rows
    breakdown: tuple[str, ...] = SEGMENT_COLUMNS
    n_anomalies: int | None = None  # default: half the accounts
    kinds: tuple[str, ...] = KINDS
    metrics: tuple[str, ...] = METRICS
    effect_range: tuple[float, float] = (0.3, 0.6)
    min_share: float = 0.25
    warmup: int = 35  # periods (days, or hours for freq="h") before the first anomaly may start
    utilisation: float = 0.85
    mean_cvr: float = 0.05
    cvr_account_sd: float = 0.3
    traffic_sd: float = 0.04
    ctr_sd: float = 0.03
    cvr_sd: float = 0.03
    cpc_sd: float = 0.03
    pilot_rows: int = 200_000

    def __post_init__(self) -> None:
        if self.freq not in ("D", "h"):
            raise ValueError(f"generate_performance.freq: must be 'D' (daily) or 'h' (hourly), got {self.freq!r}")
        if self.days < 2:
            raise ValueError(f"generate_performance.days: must be >= 2, got {self.days}")
        bad = [c for c in self.breakdown if c not in SEGMENT_COLUMNS]
        if bad:
            raise ValueError(f"generate_performance.breakdown: {bad} not in {list(SEGMENT_COLUMNS)}")
        for name, values, allowed in (("kinds", self.kinds, KINDS), ("metrics", self.metrics, METRICS)):
            wrong = [v for v in values if v not in allowed]
            if wrong or not values:
                raise ValueError(f"generate_performance.{name}: {list(values)} must be a non-empty subset of "
                                 f"{list(allowed)}")
        lo, hi = self.effect_range
        if not 0 < lo <= hi:
            raise ValueError(f"generate_performance.effect_range: need 0 < low <= high, got {self.effect_range}")
        if not 0 < self.min_share <= 1:
            raise ValueError(f"generate_performance.min_share: must be in (0, 1], got {self.min_share}")
        if self.n_anomalies is not None and self.n_anomalies < 0:
            raise ValueError(f"generate_performance.n_anomalies: must be >= 0, got {self.n_anomalies}")

    @property
    def periods(self) -> int:
        return self.days * (24 if self.freq == "h" else 1)

    @property
    def per_day(self) -> int:
        return 24 if self.freq == "h" else 1


def _rng(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11, part)))


def _cells(sim: AdMarketSimulator, cfg: PerformanceConfig) -> pd.DataFrame:
    """Static table of (account, campaign, state, device) cells: traffic share and base rates."""
    k = sim.knobs
    n_cmp = len(sim.campaign_ids)
    ad_w = np.diff(np.r_[0.0, sim.ad_cum])
    traffic_c = np.bincount(sim.campaign_of_ad, weights=ad_w, minlength=n_cmp)
    # a city's share of its country = the step of the country's cumulative population weights
    city_share = np.diff(np.r_[0.0, sim.city_cum - sim.city_country])
    first = np.r_[True, sim.city_country[1:] != sim.city_country[:-1]]
    city_share = np.where(first, sim.city_cum - sim.city_country, city_share)
    pop_s = np.bincount(sim.city_state, weights=city_share, minlength=len(sim.state_names))

    pilot = sim.sample(cfg.pilot_rows)
    ctr_c = pilot.groupby("campaign_id", observed=True)["true_ctr"].mean()
    ctr_c = ctr_c.reindex(sim.campaign_ids).fillna(float(pilot["true_ctr"].mean())).to_numpy()

    dev = np.asarray(DEVICE_EFFECT) * k["main_effect_scale"] + k["interaction_scale"] * (
        np.asarray(DEVICE_X_PLACEMENT) @ np.asarray(PLACEMENT_P))
    dev = dev - np.dot(DEVICE_P, dev)
    bid_c = np.bincount(sim.campaign_of_group, weights=sim.group_bid, minlength=n_cmp) / np.bincount(
        sim.campaign_of_group, minlength=n_cmp)
    u_cvr = cfg.cvr_account_sd * _rng(sim.seed, 0).standard_normal(sim.n_accounts)

    rows = []
    for c in range(n_cmp):
        states = np.flatnonzero(sim.state_country == sim.campaign_country[c])
        w = pop_s[states] / pop_s[states].sum()
        mean_state = float(np.dot(w, sim.state_effect[states]))
        a = int(sim.account_of_campaign[c])
        for s, ws in zip(states, w):
            for d, device in enumerate(DEVICES):
                rows.append((a, c, int(s), d, traffic_c[c] * ws * DEVICE_P[d],
                             logit(ctr_c[c]) + sim.state_effect[s] - mean_state + dev[d],
                             CPC_DISCOUNT * bid_c[c] * CPC_DEVICE[d],
                             logit(cfg.mean_cvr) + u_cvr[a] + CVR_DEVICE[d]))
    cells = pd.DataFrame(rows, columns=["a", "c", "s", "d", "share", "ctr_logit", "cpc", "cvr_logit"])
    cells["account_id"] = sim.account_ids[cells["a"]]
    cells["campaign_id"] = sim.campaign_ids[cells["c"]]
    cells["state"] = sim.state_names[cells["s"]]
    cells["country"] = sim.country_names[sim.campaign_country[cells["c"]]]
    cells["device"] = np.asarray(DEVICES, dtype=object)[cells["d"]]
    return cells


def _aggregate(cells: pd.DataFrame, breakdown: Sequence[str]) -> pd.DataFrame:
    """Cells merged to (account, *breakdown): shares add; rates are share-weighted on their own scale."""
    keys = ["a", "account_id", *breakdown]
    if "campaign_id" in breakdown or "state" in breakdown:
        keys.append("country")  # a campaign or a state has one country
    if set(breakdown) == set(SEGMENT_COLUMNS):
        return cells.assign(ctr=expit(cells["ctr_logit"]), cvr=expit(cells["cvr_logit"]))
    df = cells.assign(ctr=expit(cells["ctr_logit"]), cvr=expit(cells["cvr_logit"]))
    df["w_ctr"] = df["share"] * df["ctr"]
    df["w_cpc"] = df["w_ctr"] * df["cpc"]
    df["w_cvr"] = df["w_ctr"] * df["cvr"]
    g = df.groupby(keys, sort=True, observed=True)[["share", "w_ctr", "w_cpc", "w_cvr"]].sum().reset_index()
    g["ctr"] = g["w_ctr"] / g["share"]
    g["cpc"] = g["w_cpc"] / g["w_ctr"]
    g["cvr"] = g["w_cvr"] / g["w_ctr"]
    return g.drop(columns=["w_ctr", "w_cpc", "w_cvr"])


def _segment_share(cells: pd.DataFrame, account: str, segment: dict, metric: str) -> float:
    acc = cells[cells["account_id"] == account]
    vol = acc["share"] * (1.0 if metric == "impressions" else acc["ctr"])
    if metric == "cvr":
        vol = vol * acc["cvr"]
    inside = np.ones(len(acc), dtype=bool)
    for col, value in segment.items():
        inside &= (acc[col] == value).to_numpy()
    return float(vol[inside].sum() / vol.sum())


def _draw_anomalies(sim: AdMarketSimulator, cells: pd.DataFrame, cfg: PerformanceConfig) -> pd.DataFrame:
    rng = _rng(sim.seed, 1)
    n = sim.n_accounts // 2 if cfg.n_anomalies is None else cfg.n_anomalies
    if n > sim.n_accounts:
        raise ValueError(f"generate_performance.n_anomalies: at most one per account ({sim.n_accounts}), got {n}")
    seg_kinds = [kind for kind, cols in SEGMENT_KINDS.items() if set(cols) <= set(cfg.breakdown)]
    seg_p = np.array([SEGMENT_P[kind] for kind in seg_kinds])
    rows = []
    for i, a in enumerate(rng.choice(sim.n_accounts, size=n, replace=False)):
        account = str(sim.account_ids[a])
        kind = str(rng.choice(cfg.kinds))
        metric = str(rng.choice(cfg.metrics))
        lo, hi = DURATION[kind]
        length = int(rng.integers(lo, hi + 1)) * (cfg.per_day if kind in ("level_shift", "drift") else 1)
        latest = cfg.periods - length - 1
        if latest < cfg.warmup:
            raise ValueError(f"generate_performance.days: {cfg.days} days leave no room for a {kind} after "
                             f"warmup={cfg.warmup} periods; use more days or a shorter warmup")
        start = int(rng.integers(cfg.warmup, latest + 1))
        sign = {"spike": 1.0, "drop": -1.0}.get(kind, float(rng.choice([-1.0, 1.0])))
        effect = float(rng.uniform(*cfg.effect_range))
        # a drop in a segment can remove at most what the segment has: keep its multiplier >= 0.2
        need = max(cfg.min_share, effect / 0.8 if sign < 0 else 0.0)
        acc = cells[cells["account_id"] == account]
        segment, share = {}, 1.0
        for _ in range(100):  # redraw the segment until it is wide enough
            seg_kind = str(rng.choice(seg_kinds, p=seg_p / seg_p.sum()))
            pick = acc.iloc[int(rng.integers(len(acc)))]
            candidate = {col: pick[col] for col in SEGMENT_KINDS[seg_kind]}
            cand_share = _segment_share(cells, account, candidate, metric)
            if cand_share >= need:
                segment, share = candidate, cand_share
                break
        mult = float(np.clip(1.0 + sign * effect / share, 0.05, 4.0))
        rows.append({
            "anomaly_id": f"anomaly_{i:03d}", "kind": kind, "start": start, "end": start + length - 1,
            "metric": metric, "affected": ",".join(AFFECTED[metric]),
            "direction": "positive" if sign > 0 else "negative", "effect": effect, "multiplier": mult,
            "segment_share": share, "account_id": account, "campaign_id": segment.get("campaign_id"),
            "state": segment.get("state"), "device": segment.get("device"),
        })
    cols = ["anomaly_id", "kind", "start", "end", "metric", "affected", "direction", "effect", "multiplier",
            "segment_share", "account_id", "campaign_id", "state", "device"]
    return pd.DataFrame(rows, columns=cols).sort_values("anomaly_id", ignore_index=True)


def generate_performance(sim: AdMarketSimulator, **knobs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(series, anomalies) for `sim`'s world; `knobs` are `PerformanceConfig` fields.

    series: timestamp, account_id, [campaign_id, country, state, device,] impressions, clicks,
    conversions, spend, ctr, cvr, cpc. anomalies: see the module docstring; `start`/`end` are
    timestamps there (periods in the generator).
    """
    unknown = set(knobs) - {f.name for f in dataclasses.fields(PerformanceConfig)}
    if unknown:
        raise ValueError(f"generate_performance: unknown arguments {sorted(unknown)}; "
                         f"expected {[f.name for f in dataclasses.fields(PerformanceConfig)]}")
    if "breakdown" in knobs:
        knobs["breakdown"] = tuple(knobs["breakdown"])
    for key in ("kinds", "metrics", "effect_range"):
        if key in knobs:
            knobs[key] = tuple(knobs[key])
    cfg = PerformanceConfig(**knobs)
    full = _cells(sim, cfg)
    anomalies = _draw_anomalies(sim, full.assign(ctr=expit(full["ctr_logit"]), cvr=expit(full["cvr_logit"])), cfg)
    cells = _aggregate(full, cfg.breakdown)
    T, K = cfg.periods, len(cells)
    start = pd.Timestamp(sim.knobs["start"]).normalize()
    step = pd.Timedelta(hours=1) if cfg.freq == "h" else pd.Timedelta(days=1)
    times = pd.DatetimeIndex(start + step * np.arange(T))
    dow = times.dayofweek.to_numpy()
    hour = times.hour.to_numpy()

    weekly = np.where(np.arange(7) >= 5, WEEKEND_TRAFFIC, 1.0)
    weekly = weekly / weekly.mean()
    season = sim.knobs["seasonality_scale"] * (np.asarray(DOW_EFFECT) - np.mean(DOW_EFFECT))[dow]
    traffic_t = weekly[dow]
    if cfg.freq == "h":
        hourly = 1 + 0.6 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24)
        hourly = hourly / hourly.mean()
        traffic_t = traffic_t * hourly[hour] / 24.0
        season = season + sim.knobs["seasonality_scale"] * (sim.hour_table - np.dot(hourly, sim.hour_table) / 24)[hour]

    share = cells["share"].to_numpy()
    ctr0, cvr0, cpc0 = (cells[c].to_numpy() for c in ("ctr", "cvr", "cpc"))
    budget = float(sim.campaign_budget.sum())
    market = cfg.utilisation * budget / float(np.sum(share * ctr0 * cpc0))  # impressions per day

    noise = _rng(sim.seed, 2)
    n_acc, n_cmp = sim.n_accounts, len(sim.campaign_ids)
    e_a = np.zeros((T, n_acc))
    shocks = noise.standard_normal((T, n_acc)) * cfg.traffic_sd * math.sqrt(1 - 0.36)
    e_a[0] = noise.standard_normal(n_acc) * cfg.traffic_sd
    for t in range(1, T):
        e_a[t] = 0.6 * e_a[t - 1] + shocks[t]
    e_c = noise.standard_normal((T, n_cmp)) * cfg.traffic_sd
    n_a, v_a, q_a = (noise.standard_normal((T, n_acc)) * sd for sd in (cfg.ctr_sd, cfg.cvr_sd, cfg.cpc_sd))

    a_idx = cells["a"].to_numpy()
    mult = {m: np.ones((T, K)) for m in METRICS}
    for row in anomalies.itertuples():
        inside = (cells["account_id"] == row.account_id).to_numpy().copy()
        for col in SEGMENT_COLUMNS:
            value = getattr(row, col)
            if not pd.isna(value) and col in cells:
                inside &= (cells[col] == value).to_numpy()
        span = np.arange(row.start, row.end + 1)
        if row.kind == "drift":
            ramp = (np.arange(len(span)) + 1) / len(span)
            factor = 1.0 + (row.multiplier - 1.0) * ramp
        else:
            factor = np.full(len(span), row.multiplier)
        mult[row.metric][np.ix_(span, np.flatnonzero(inside))] *= factor[:, None]

    if "campaign_id" in cells:
        c_idx = pd.Index(sim.campaign_ids).get_indexer(cells["campaign_id"])
        traffic_noise = e_c[:, c_idx]
    else:  # campaigns merged: their independent noise averages out
        traffic_noise = np.zeros((T, K))
    mu = market * share[None] * traffic_t[:, None] * np.exp(e_a[:, a_idx] + traffic_noise) * mult["impressions"]
    ctr = np.clip(expit(logit(ctr0)[None] + season[:, None] + n_a[:, a_idx]) * mult["ctr"], 0.0, 1.0)
    cvr = np.clip(expit(logit(cvr0)[None] + v_a[:, a_idx]) * mult["cvr"], 0.0, 1.0)
    cpc = cpc0[None] * np.exp(q_a[:, a_idx]) * mult["cpc"]

    counts = _rng(sim.seed, 3)
    imps = counts.poisson(mu)
    clicks = counts.binomial(imps, ctr)
    conv = counts.binomial(clicks, cvr)
    spend = np.where(clicks > 0, counts.gamma(np.maximum(clicks, 1) * SPEND_SHAPE, cpc / SPEND_SHAPE), 0.0)

    seg_cols = [c for c in ("campaign_id", "country", "state", "device") if c in cells]
    series = pd.DataFrame({"timestamp": np.repeat(times.to_numpy(), K),
                           "account_id": np.tile(cells["account_id"].to_numpy(), T)})
    for col in seg_cols:
        series[col] = np.tile(cells[col].to_numpy(), T)
    series["impressions"] = imps.ravel()
    series["clicks"] = clicks.ravel()
    series["conversions"] = conv.ravel()
    series["spend"] = np.round(spend.ravel(), 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        series["ctr"] = np.where(series["impressions"] > 0, series["clicks"] / series["impressions"], 0.0)
        series["cvr"] = np.where(series["clicks"] > 0, series["conversions"] / series["clicks"], 0.0)
        series["cpc"] = np.where(series["clicks"] > 0, series["spend"] / series["clicks"], 0.0)
    for col in ("account_id", *seg_cols):
        series[col] = series[col].astype(str)
    anomalies = anomalies.assign(start=times[anomalies["start"].to_numpy(dtype=np.int64)],
                                 end=times[anomalies["end"].to_numpy(dtype=np.int64)])
    for col in SEGMENT_COLUMNS:  # None, not NaN, for "the whole account along this column"
        anomalies[col] = anomalies[col].astype(object).where(anomalies[col].notna(), None)
    return series, anomalies
