"""Account health panel with churn labels, for the accounts of an ``AdMarketSimulator`` world.

``AccountChurnSimulator(sim).panel()`` gives one row per account-month (``months`` months, an account
leaves the panel after the month it churns); ``snapshot(month)`` gives one row per account alive at
that month. Levels come from the world: each account's campaigns (their number and daily budgets),
its click-rate random effects (``b0 + u_account + mean u_campaign``) and, when the world was built
with ``drift=``, its drift shift ``drift_account`` from month ``ceil(start_frac * months)`` on (a
drifting account's CTR falls or rises, its ``ctr_trend`` shows it, and its churn risk moves).

Monthly dynamics
----------------
A latent engagement ``e[a, t] = mu_a + RHO * (e[a, t-1] - mu_a) + N(0, E_SD^2)`` (``mu_a ~ N(0, MU_SD^2)``)
drives every indicator, so they are correlated like real ones::

    budget_utilization   = sigmoid(0.8 + 0.9 e + N(0, 0.35^2))                 (spend / budget)
    active_campaigns     ~ Binomial(n_campaigns, sigmoid(0.8 + 0.8 e))
    monthly_spend        = 30.4 * daily_budget * budget_utilization * (0.3 + 0.7 active / n_campaigns)
    ctr                  = sigmoid(b0 + u_account + mean u_campaign + drift_t + 0.25 e + N(0, 0.15^2))
    conversion_rate      = sigmoid(-3.2 + 0.4 v_a + 0.3 e + N(0, 0.1^2)),  v_a ~ N(0, 1)
    days_since_last_launch: a launch happens with prob sigmoid(-1 + e); then U{0..29} days, else +30 (cap 365)
    support_tickets      ~ Poisson(exp(-0.3 - 0.5 e))
    account_age_months   = age0_a + t,  age0_a ~ U{1..72}
    spend_trend          = log(monthly_spend_t) - mean(log monthly_spend over the previous trend_window months)
    ctr_trend            = log(ctr_t) - mean(log ctr over the previous trend_window months)
    (both 0 in an account's first month)

Churn (the known truth)
-----------------------
In month ``t`` an account alive at its start churns with::

    logit P(churn) = c0 + sum_j COEF[j] * x_j
        COEF = {spend_trend: -2.0, ctr_trend: -3.0, support_tickets: +0.45,
                days_since_last_launch: +0.0117 (= 0.35 per 30 days), budget_utilization: -2.5}

``c0`` is solved (brentq) so the mean of ``P(churn)`` over every account-month equals
``monthly_churn``. The other five indicators (``monthly_spend``, ``ctr``, ``conversion_rate``,
``active_campaigns``, ``account_age_months``) do not enter the formula, but correlate with the true
factors through ``e``: a model's contributing factors should rank the five true ones first.
``true_contributions(df)`` gives each true factor's centred term ``COEF[j] * (x_j - mean x_j)``, the
logit-scale SHAP value of the true additive model, to compare with a fitted model's SHAP values.

Determinism: every draw comes from ``SeedSequence(sim.seed, spawn_key=(16, 1))``, a stream the
simulator does not use, in a fixed order before any account is removed, so the same world and
knobs give the same panel.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit

from within.data.simulator import AdMarketSimulator

__all__ = ["CHURN_COEF", "INDICATORS", "AccountChurnSimulator", "trailing_mean"]

# The true churn factors and their logit coefficients per unit of the indicator.
CHURN_COEF: dict[str, float] = {
    "spend_trend": -2.0,
    "ctr_trend": -3.0,
    "support_tickets": 0.45,
    "days_since_last_launch": 0.35 / 30.0,
    "budget_utilization": -2.5,
}
NON_CAUSAL = ("monthly_spend", "ctr", "conversion_rate", "active_campaigns", "account_age_months")
INDICATORS: tuple[str, ...] = (*CHURN_COEF, *NON_CAUSAL)
RHO, E_SD, MU_SD = 0.7, 0.6, 0.5
DAYS_PER_MONTH = 30.4


def trailing_mean(values: np.ndarray, groups: np.ndarray, window: int) -> np.ndarray:
    """Mean of each row's previous ``window`` values within its group (rows in time order per group).

    A group's first row has no history and gets its own value, so a trend ``x - trailing_mean``
    starts at 0. Rows of one group need not be contiguous; their relative order is time order.
    """
    if window < 1:
        raise ValueError(f"trailing_mean: window must be >= 1, got {window}")
    x = pd.Series(np.asarray(values, dtype=np.float64))
    g = pd.Series(np.asarray(groups))
    prev = x.groupby(g, sort=False).transform(lambda s: s.shift(1).rolling(window, min_periods=1).mean())
    return prev.fillna(x).to_numpy()


class AccountChurnSimulator:
    """Monthly health indicators and churn labels for ``sim``'s accounts (see the module docstring).

    months: how many months the panel spans. trend_window: months behind ``spend_trend`` and
    ``ctr_trend``. monthly_churn: the mean churn probability over all account-months (sets ``c0``).
    """

    def __init__(self, sim: AdMarketSimulator, months: int = 24, trend_window: int = 3,
                 monthly_churn: float = 0.05) -> None:
        if not isinstance(sim, AdMarketSimulator):
            raise TypeError(f"AccountChurnSimulator.sim: expected an AdMarketSimulator, got {type(sim).__name__}")
        if int(months) < 2:
            raise ValueError(f"AccountChurnSimulator.months: must be >= 2, got {months}")
        if int(trend_window) < 1:
            raise ValueError(f"AccountChurnSimulator.trend_window: must be >= 1, got {trend_window}")
        if not 0.0 < monthly_churn < 0.5:
            raise ValueError(f"AccountChurnSimulator.monthly_churn: must be in (0, 0.5), got {monthly_churn}")
        self.sim = sim
        self.months = int(months)
        self.trend_window = int(trend_window)
        self.monthly_churn = float(monthly_churn)
        self.coef = dict(CHURN_COEF)
        self._full = self._simulate()

    # ------------------------------------------------------------------ world
    def _simulate(self) -> pd.DataFrame:
        sim, m = self.sim, self.months
        na = sim.n_accounts
        rng = np.random.default_rng(np.random.SeedSequence(sim.seed, spawn_key=(16, 1)))
        n_campaigns = np.bincount(sim.account_of_campaign, minlength=na)
        daily_budget = np.bincount(sim.account_of_campaign, weights=sim.campaign_budget, minlength=na)
        mean_u_cmp = np.bincount(sim.account_of_campaign, weights=sim.campaign_effect, minlength=na) / n_campaigns
        base_logit = sim.b0 + sim.account_effect + mean_u_cmp
        drift_from = math.ceil(sim.drift["start_frac"] * m)
        drift = np.where(np.arange(m)[None, :] >= drift_from, sim.drift_account[:, None], 0.0)

        mu = rng.normal(0.0, MU_SD, na)
        e = np.empty((na, m))
        e[:, 0] = mu + rng.normal(0.0, E_SD / math.sqrt(1 - RHO**2), na)  # stationary start
        for t in range(1, m):
            e[:, t] = mu + RHO * (e[:, t - 1] - mu) + rng.normal(0.0, E_SD, na)
        shape = (na, m)
        util = expit(0.8 + 0.9 * e + rng.normal(0.0, 0.35, shape))
        active = rng.binomial(n_campaigns[:, None], expit(0.8 + 0.8 * e))
        spend = DAYS_PER_MONTH * daily_budget[:, None] * util * (0.3 + 0.7 * active / n_campaigns[:, None])
        ctr = expit(base_logit[:, None] + drift + 0.25 * e + rng.normal(0.0, 0.15, shape))
        cvr = expit(-3.2 + 0.4 * rng.normal(0.0, 1.0, na)[:, None] + 0.3 * e + rng.normal(0.0, 0.1, shape))
        launched = rng.random(shape) < expit(-1.0 + e)
        fresh = rng.integers(0, 30, shape)
        days = np.empty(shape)
        last = rng.integers(0, 90, na).astype(np.float64)
        for t in range(m):
            last = np.where(launched[:, t], fresh[:, t], np.minimum(last + 30.0, 365.0))
            days[:, t] = last
        tickets = rng.poisson(np.exp(-0.3 - 0.5 * e))
        age = rng.integers(1, 73, na)[:, None] + np.arange(m)[None, :]
        u_churn = rng.random(shape)

        acc = np.repeat(np.arange(na), m)
        df = pd.DataFrame({
            "account_id": np.asarray(sim.account_ids, dtype=object)[acc],
            "month": np.tile(np.arange(m), na),
            "spend_trend": np.log(spend).ravel() - trailing_mean(np.log(spend).ravel(), acc, self.trend_window),
            "ctr_trend": np.log(ctr).ravel() - trailing_mean(np.log(ctr).ravel(), acc, self.trend_window),
            "support_tickets": tickets.ravel().astype(np.int64),
            "days_since_last_launch": days.ravel(),
            "budget_utilization": util.ravel(),
            "monthly_spend": spend.ravel(),
            "ctr": ctr.ravel(),
            "conversion_rate": cvr.ravel(),
            "active_campaigns": active.ravel().astype(np.int64),
            "account_age_months": age.ravel().astype(np.int64),
        })
        eta = self._eta(df)
        self.c0 = float(brentq(lambda c: expit(c + eta).mean() - self.monthly_churn, -30.0, 30.0, xtol=1e-12))
        df["churn_probability"] = expit(self.c0 + eta)
        df["churned"] = (u_churn.ravel() < df["churn_probability"].to_numpy()).astype(np.int64)
        return df

    def _eta(self, df: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.coef if c not in df.columns]
        if missing:
            raise ValueError(f"AccountChurnSimulator: frame lacks the churn factors {missing}")
        return sum(w * df[c].to_numpy(np.float64) for c, w in self.coef.items())

    # ------------------------------------------------------------------ public API
    def panel(self, include_after_churn: bool = False) -> pd.DataFrame:
        """Account-months in (account, month) order; an account's last row is its churn month or month
        ``months - 1``. Columns: account_id, month, the ten ``INDICATORS``, churn_probability, churned.

        ``include_after_churn=True`` keeps every account-month of the grid (indicators and draws exist
        for all of them), e.g. to compare accounts at the same month whether or not they churned."""
        if include_after_churn:
            return self._full.copy()
        churn_month = self._full["month"].where(self._full["churned"] == 1).groupby(
            self._full["account_id"], sort=False).transform("min").fillna(self.months)
        return self._full.loc[self._full["month"] <= churn_month].reset_index(drop=True)

    def snapshot(self, month: int) -> pd.DataFrame:
        """One row per account alive at the start of ``month``; ``churned`` says it churned that month."""
        if not 0 <= int(month) < self.months:
            raise ValueError(f"snapshot.month: must be in [0, {self.months - 1}], got {month}")
        p = self.panel()
        return p.loc[p["month"] == int(month)].reset_index(drop=True)

    def true_logit(self, df: pd.DataFrame) -> np.ndarray:
        """``c0 + sum_j COEF[j] x_j`` from a frame's columns (the formula in the module docstring)."""
        return self.c0 + self._eta(df)

    def true_contributions(self, df: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per row and true factor, ``COEF[j] * (x_j - mean x_j)`` (means over ``reference``, default ``df``):
        the exact SHAP values of the true logit, for comparing with a model's SHAP values."""
        ref = df if reference is None else reference
        return pd.DataFrame({c: w * (df[c].to_numpy(np.float64) - ref[c].to_numpy(np.float64).mean())
                             for c, w in self.coef.items()}, index=df.index)

    def summary(self) -> Mapping[str, float]:
        p = self.panel()
        return {"accounts": int(self.sim.n_accounts), "months": self.months, "rows": len(p),
                "churned_accounts": int(p["churned"].sum()), "monthly_churn_rate": float(p["churned"].mean()),
                "c0": self.c0}
