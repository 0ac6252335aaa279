"""Post-fit step `intervals`: intervals for the TRUE click probability, fitted on the calib split.

`ProbabilityIntervals` (within/calibration/intervals.py) regresses the truth on the raw logit
(a Berkson model) and identifies the spread from pairs of calib rows that share a unit. The units
are, by default, every categorical and group field of the feature spec plus a `content` key (the
text fields together: rows showing the same creative); `intervals.keys: [col, ...]` in the run
config replaces that list with frame columns of your choice. With an ensemble it also takes the
member logits, whose spread says which rows are noisier.

Rows: by default the val AND calib splits together (`intervals.splits`). The spread is a moment
estimate from click pairs whose noise falls like 1 / rows: over label redraws from the truth on the
default run's model, 80k calib rows gave coverage of true_ctr 0.86 +- 0.13 and 160k val + calib rows
0.87 +- 0.03 (weight_power 0; 0.91 +- 0.02 at 0.5, and 0.86 +- 0.06 at 0.5 on seed 11's model). Val
only chose the early-stopping epoch, which barely touches the pair covariances; the calibrator
itself still fits on calib alone.

The step also reports the spread's moment noise (`intervals/tau2`, `intervals/tau2_se`, and
`intervals/coverage_band_low/high`: the coverage if the truth's spread were one standard error
away) and warns when that noise is over 25% of the spread. What it cannot report is the share of
the spread the pair moments miss (19-28% on the simulator, where busy, well-learnt ads weigh too
much; see within/calibration/intervals.py and
benchmarks/interval_identifiability.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from within.postfit.context import PostfitContext, labels_of

CONTENT_KEY = "content"
log = logging.getLogger(__name__)


def interval_keys(model, frame: pd.DataFrame, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """{key: values} of the units whose rows share parts of the model's error (see module docstring)."""
    if columns:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"intervals.keys: columns {missing} are not in the calib frame (have {sorted(frame.columns)[:30]})")
        return {c: frame[c].to_numpy() for c in columns}
    spec = model.spec
    names = [f.name for f in spec.of_type("categorical") + spec.groups]
    keys = {c: frame[c].to_numpy() for c in dict.fromkeys(names) if c in frame.columns}
    text = [f.name for f in spec.text if f.name in frame.columns]
    if text:
        keys[CONTENT_KEY] = frame[text].astype(str).agg("\x1f".join, axis=1).to_numpy()
    return keys


def check_splits(splits) -> list[str]:
    """`intervals.splits` as a list of names; test (scored) and train (fitted) are refused."""
    names = [splits] if isinstance(splits, str) else list(splits)
    if "test" in names:
        raise ValueError("intervals.splits: 'test' is not allowed (intervals are scored on test); use val and/or calib")
    unknown = [n for n in names if n not in ("val", "calib")]
    if unknown:
        raise ValueError(f"intervals.splits: {unknown} not allowed; choose from val, calib (the model fitted train)")
    return names


class Intervals:
    """Fit ProbabilityIntervals on the val + calib raw logits and store it on the model."""

    name = "intervals"

    @staticmethod
    def skip_reason(model) -> str | None:
        return None if hasattr(model, "logits_with_members") else f"{type(model).__name__} has no logits_with_members"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.intervals import ProbabilityIntervals

        settings = ctx.settings("intervals")
        alpha = float(settings.get("alpha", 0.1))
        split, frame = self.fit_frame(ctx, settings.get("splits", ("val", "calib")))
        logits, members = ctx.model.logits_with_members(frame)
        y, w = labels_of(ctx.model, frame)
        columns = settings.get("keys")
        keys = interval_keys(ctx.model, frame, list(columns) if columns else None)
        intervals = ProbabilityIntervals(max_fit_rows=int(settings.get("max_fit_rows", 200_000)),
                                         seed=int(settings.get("seed", 0)),
                                         pairs=bool(settings.get("pairs", True)),
                                         residual_var=settings.get("residual_var"),
                                         weight_power=float(settings.get("weight_power", 0.5)))
        intervals.fit(logits, y, keys=keys, member_logits=members, weight=w)
        ctx.model.intervals = intervals
        calib_split, calib_frame = ctx.calibration_frame()
        ctx.metrics.update(interval_metrics(ctx.model, calib_frame, calib_split, alpha))
        ctx.metrics.update(spread_metrics(intervals, alpha))
        warn_if_uncertain(intervals, alpha, len(frame), split)
        ctx.metadata["intervals"] = {"split": split, "alpha": alpha, "uses_members": members is not None,
                                     "method": "berkson_crossed_moments", "keys": sorted(keys),
                                     "params": intervals.params_,
                                     "components": {k: v for k, v in intervals.components_.items() if v > 0}}

    @staticmethod
    def fit_frame(ctx: PostfitContext, splits) -> tuple[str, pd.DataFrame]:
        """The named splits that exist, concatenated ('val+calib'); never test."""
        parts = {n: ctx.frames.get(n) for n in check_splits(splits)}
        parts = {n: f for n, f in parts.items() if f is not None and len(f)}
        if not parts:
            return ctx.calibration_frame()
        return "+".join(parts), pd.concat(list(parts.values()), ignore_index=True)


def spread_metrics(intervals, alpha: float) -> dict[str, float]:
    """The fitted spread tau^2, its moment standard error, and the coverage band that error implies."""
    low, high = intervals.coverage_band(alpha)
    return {"intervals/tau2": intervals.params_["tau2"], "intervals/tau2_se": intervals.params_.get("tau2_se", 0.0),
            "intervals/coverage_band_low": low, "intervals/coverage_band_high": high}


def warn_if_uncertain(intervals, alpha: float, rows: int, split: str, max_rel_se: float = 0.25) -> None:
    """A warning, with the fix, when the moment noise alone could move coverage far from 1 - alpha."""
    tau2, se = intervals.params_["tau2"], intervals.params_.get("tau2_se", 0.0)
    if intervals.residual_var is not None or not se > max_rel_se * tau2:
        return
    low, high = intervals.coverage_band(alpha)
    log.warning(
        "intervals: the truth's spread around the score is %.3f +- %.3f (from %s, %d rows), so the %.0f%% "
        "intervals may cover anywhere from %.2f to %.2f of true CTRs. The noise falls like 1 / rows: fit on more "
        "held-out rows (data.split.calib_frac, intervals.splits), or set intervals.residual_var from a study "
        "with known truth. (Neither shows the share of the spread the pair moments miss; see "
        "benchmarks/interval_identifiability.py.)", tau2, se, split, rows, 100 * (1 - alpha), low, high)


def interval_metrics(model, frame, split: str = "test", alpha: float = 0.1) -> dict[str, float]:
    """Mean interval width and, where the frame has the simulator truth, coverage of the true CTR."""
    from within.calibration.intervals import coverage, mean_width

    if getattr(model, "intervals", None) is None:
        return {}
    _, lo, hi = model.predict_with_intervals(frame, alpha=alpha)
    out = {f"{split}/interval_width": mean_width(lo, hi)}
    spec = model.spec
    if spec.truth and spec.truth in frame:
        out[f"{split}/interval_coverage_true"] = coverage(lo, hi, frame[spec.truth].to_numpy(dtype=np.float64))
    return out
