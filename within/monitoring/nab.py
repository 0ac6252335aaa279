"""NAB scoring: the windowed, early-detection-rewarding score of the Numenta Anomaly Benchmark.

Written from the published description (Lavin & Ahmad 2015, "Evaluating Real-time Anomaly Detection
Algorithms - the Numenta Anomaly Benchmark", and NAB's README/wiki), checked against NAB's per-file
results (tests/test_nab.py). No NAB code is copied.

For one series of ``n`` rows with anomaly windows ``[a_k, b_k]`` (row indices, inclusive; width
``w_k = b_k - a_k + 1``) and a profile with weights ``A_TP, A_FP, A_FN``:

* The first ``probationary_length(n) = min(floor(0.15 n), 0.15 * 5000)`` rows are a warm-up: flags there
  are ignored, and so are windows that lie wholly inside it.
* ``sigma(y) = 2 / (1 + exp(5 y)) - 1`` (and ``-1`` for ``y > 3``): +0.987 at ``y = -1``, 0 at ``y = 0``,
  -0.987 at ``y = 1``.
* Flagging row ``i`` inside window ``k`` is worth ``A_TP * sigma(y) / sigma(-1)`` with
  ``y = -(b_k - i + 1) / w_k``: a detection at the window's first row earns exactly ``A_TP``; later ones less.
  Only the best (earliest) detection of a window counts; a window with no detection costs ``-A_FN``.
* Flagging row ``i`` outside every window costs ``A_FP * sigma(y)`` with ``y = (i - b_prev) / (w_prev - 1)``
  relative to the previous window's end (a flag just after a window costs almost nothing, one far
  after it costs ``A_FP``), and ``-A_FP`` when no window precedes ``i``. Every such row counts.
* A file's raw score is the sum; a corpus' raw score is the sum over its files.
* Normalised score: ``100 * (raw - raw_null) / (raw_perfect - raw_null)``, where the null detector never
  flags (``raw_null = -A_FN * #windows``) and the perfect one flags each window's first row
  (``raw_perfect = A_TP * #windows``, NAB's normalisation).
* Threshold optimisation (per detector and profile): the detector's anomaly scores in [0, 1] become
  flags ``score >= threshold``; NAB picks the threshold that maximises the corpus raw score. Here the
  raw score is computed for every distinct score value at once (a sweep over the sorted scores), so
  the optimum is exact. ``optimize_threshold(..., detect=f)`` searches candidate thresholds for
  detectors whose flags depend on the threshold in other ways (alarm cool-downs).

TP/TN/FP/FN counts are per row over the scored (post-probation) rows, as NAB reports them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

PROBATIONARY_PERCENT = 0.15


@dataclasses.dataclass(frozen=True)
class Profile:
    """Weights of one NAB application profile."""

    tp: float = 1.0
    fp: float = 0.11
    fn: float = 1.0
    tn: float = 1.0

    def __post_init__(self) -> None:
        for field in ("tp", "fp", "fn", "tn"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"Profile.{field}: must be a finite weight >= 0, got {value!r}")


PROFILES: dict[str, Profile] = {
    "standard": Profile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": Profile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": Profile(tp=1.0, fp=0.11, fn=2.0),
}


def profiles_from_json(obj: Mapping) -> dict[str, Profile]:
    """NAB's config/profiles.json ({name: {"CostMatrix": {"tpWeight": ...}}}) as Profiles."""
    out = {}
    for name, body in obj.items():
        cm = body["CostMatrix"]
        out[name] = Profile(tp=cm["tpWeight"], fp=cm["fpWeight"], fn=cm["fnWeight"], tn=cm["tnWeight"])
    return out


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"NAB profile {profile!r} is unknown; choose one of {sorted(PROFILES)}")
    return PROFILES[profile]


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """2 / (1 + exp(5 y)) - 1, and -1 beyond y > 3 (far past a window)."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y > 3.0, -1.0, 2.0 / (1.0 + np.exp(np.minimum(5.0 * y, 700.0))) - 1.0)


MAX_TP = float(scaled_sigmoid(-1.0))


def probationary_length(n: int, percent: float = PROBATIONARY_PERCENT) -> int:
    """Rows at the start of a file whose flags are ignored."""
    return math.ceil(min(math.floor(percent * n), percent * 5000))


def _check_windows(n: int, windows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out, prev_end = [], -1
    for k, (lo, hi) in enumerate(windows):
        lo, hi = int(lo), int(hi)
        if not 0 <= lo <= hi < n:
            raise ValueError(f"windows[{k}]: ({lo}, {hi}) must satisfy 0 <= start <= end < n={n}")
        if lo <= prev_end:
            raise ValueError(f"windows[{k}]: starts at row {lo}, inside or before the previous window (ends {prev_end})")
        out.append((lo, hi))
        prev_end = hi
    return out


@dataclasses.dataclass(frozen=True)
class ScoringFile:
    """What NAB needs of one series: its length, its windows (row indices) and a name."""

    name: str
    n: int
    windows: tuple[tuple[int, int], ...]
    probation_percent: float = PROBATIONARY_PERCENT

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple(_check_windows(self.n, self.windows)))

    @property
    def probation(self) -> int:
        return probationary_length(self.n, self.probation_percent)

    def window_of_row(self) -> np.ndarray:
        """Window number of each row, -1 outside every window."""
        win = np.full(self.n, -1, dtype=np.int64)
        for k, (lo, hi) in enumerate(self.windows):
            win[lo:hi + 1] = k
        return win

    def scored_windows(self) -> list[int]:
        """Windows with at least one row after the probationary period (the ones that count)."""
        return [k for k, (_, hi) in enumerate(self.windows) if hi >= self.probation]

    def row_values(self, profile: str | Profile) -> np.ndarray:
        """What flagging each row is worth: TP value inside a window, (negative) FP cost outside."""
        p = get_profile(profile)
        rows = np.arange(self.n, dtype=np.float64)
        out = np.full(self.n, -p.fp)  # before any window: a far false positive
        for k, (lo, hi) in enumerate(self.windows):
            width = hi - lo + 1
            out[lo:hi + 1] = p.tp * scaled_sigmoid(-(hi - rows[lo:hi + 1] + 1) / width) / MAX_TP
            stop = self.windows[k + 1][0] if k + 1 < len(self.windows) else self.n
            after = rows[hi + 1:stop]
            out[hi + 1:stop] = p.fp * scaled_sigmoid((after - hi) / max(width - 1, 1))
        return out


@dataclasses.dataclass(frozen=True)
class FileScore:
    """Raw NAB score of one file at one threshold, with NAB's per-row counts."""

    name: str
    threshold: float
    score: float
    tp: int
    tn: int
    fp: int
    fn: int
    detected_windows: int
    windows: int

    @property
    def total(self) -> int:
        return self.tp + self.tn + self.fp + self.fn


def score_flags(file: ScoringFile, flags: np.ndarray, profile: str | Profile, threshold: float = float("nan")) -> FileScore:
    """Raw score of boolean detections `flags` (len n) on `file`."""
    p = get_profile(profile)
    flags = np.asarray(flags, dtype=bool)
    if flags.shape != (file.n,):
        raise ValueError(f"flags: expected shape ({file.n},) for {file.name}, got {flags.shape}")
    value, win = file.row_values(p), file.window_of_row()
    scored = np.arange(file.n) >= file.probation
    hit = flags & scored
    outside = win < 0
    score = float(value[hit & outside].sum())
    detected = 0
    for k in file.scored_windows():
        in_k = hit & (win == k)
        if in_k.any():
            score += float(value[in_k].max())
            detected += 1
        else:
            score -= p.fn
    tp = int((hit & ~outside).sum())
    fp = int((hit & outside).sum())
    return FileScore(file.name, threshold, score, tp=tp, tn=int((scored & outside).sum()) - fp, fp=fp,
                     fn=int((scored & ~outside).sum()) - tp, detected_windows=detected,
                     windows=len(file.scored_windows()))


def score_file(file: ScoringFile, scores: np.ndarray, threshold: float, profile: str | Profile) -> FileScore:
    """Raw score of anomaly scores flagged at `scores >= threshold`."""
    scores = np.asarray(scores, dtype=np.float64)
    return score_flags(file, scores >= threshold, profile, threshold)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Corpus raw score at every distinct threshold (descending); thresholds[0] is +inf (no flags)."""

    thresholds: np.ndarray
    scores: np.ndarray

    def best(self) -> tuple[float, float]:
        """(threshold, raw score) of the maximum; the highest threshold among ties."""
        i = int(np.argmax(self.scores))
        return float(self.thresholds[i]), float(self.scores[i])


def _file_sweep(file: ScoringFile, scores: np.ndarray, p: Profile) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores, score deltas) of the scored rows in descending-score order, and the no-flag raw score."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (file.n,):
        raise ValueError(f"scores: expected shape ({file.n},) for {file.name}, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores: {file.name} holds NaN or infinite anomaly scores")
    keep = np.arange(file.n) >= file.probation
    s, value, win = scores[keep], file.row_values(p)[keep], file.window_of_row()[keep]
    order = np.argsort(-s, kind="stable")
    s, value, win = s[order], value[order], win[order]
    delta = np.where(win < 0, value, 0.0)
    best = dict.fromkeys(file.scored_windows(), -p.fn)
    for j in np.flatnonzero(win >= 0):  # a window's value is its best flag so far (-A_FN before any)
        k = int(win[j])
        if value[j] > best[k]:
            delta[j] = value[j] - best[k]
            best[k] = value[j]
    return s, delta, -p.fn * len(best)


def sweep(files: Sequence[ScoringFile], scores: Sequence[np.ndarray], profile: str | Profile) -> Sweep:
    """Raw corpus score for every threshold `score >= t`, t over the distinct anomaly scores."""
    if len(files) != len(scores):
        raise ValueError(f"sweep: {len(files)} files but {len(scores)} score arrays")
    p = get_profile(profile)
    parts = [_file_sweep(f, s, p) for f, s in zip(files, scores)]
    s = np.concatenate([x[0] for x in parts]) if parts else np.empty(0)
    delta = np.concatenate([x[1] for x in parts]) if parts else np.empty(0)
    base = sum(x[2] for x in parts)
    order = np.argsort(-s, kind="stable")  # each file's rows stay in their own (descending) order
    s, total = s[order], base + np.cumsum(delta[order])
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.empty(0, dtype=bool)
    return Sweep(np.r_[np.inf, s[last_of_tie]], np.r_[base, total[last_of_tie]])


def optimize_threshold(files: Sequence[ScoringFile], scores: Sequence[np.ndarray], profile: str | Profile,
                       detect: Callable[[np.ndarray, float], np.ndarray] | None = None,
                       candidates: Sequence[float] | None = None) -> tuple[float, float]:
    """(threshold, corpus raw score) that maximises the raw score for `profile`.

    Without `detect`: exact, over every distinct score (flags = score >= threshold). With
    `detect(scores, threshold) -> flags`: the best of `candidates` (default: 200 quantiles of the
    scored rows' distinct scores, upper tail first).
    """
    if detect is None:
        return sweep(files, scores, profile).best()
    if candidates is None:
        pooled = np.unique(np.concatenate([np.asarray(s)[f.probation:] for f, s in zip(files, scores)]))
        candidates = np.unique(np.quantile(pooled, 1.0 - np.geomspace(1e-4, 1.0, 200)))
    best_t, best_raw = float("inf"), -float("inf")
    for t in sorted(candidates, reverse=True):
        raw = sum(score_flags(f, detect(np.asarray(s), float(t)), profile).score for f, s in zip(files, scores))
        if raw > best_raw:
            best_t, best_raw = float(t), raw
    return best_t, best_raw


def null_score(files: Sequence[ScoringFile], profile: str | Profile) -> float:
    """Raw score of the detector that never flags."""
    return -get_profile(profile).fn * sum(len(f.scored_windows()) for f in files)


def perfect_score(files: Sequence[ScoringFile], profile: str | Profile) -> float:
    """NAB's perfect raw score: A_TP per labelled window."""
    return get_profile(profile).tp * sum(len(f.windows) for f in files)


def normalized_score(raw: float, files: Sequence[ScoringFile], profile: str | Profile) -> float:
    """100 * (raw - null) / (perfect - null): 0 for the null detector, 100 for the perfect one."""
    null, perfect = null_score(files, profile), perfect_score(files, profile)
    if perfect == null:
        raise ValueError("normalized_score: the files hold no anomaly windows, so there is nothing to normalise by")
    return 100.0 * (raw - null) / (perfect - null)


def score_corpus(files: Sequence[ScoringFile], scores: Sequence[np.ndarray], threshold: float,
                 profile: str | Profile) -> dict:
    """Per-file FileScores at one threshold, their raw total and the normalised score."""
    per_file = [score_file(f, s, threshold, profile) for f, s in zip(files, scores)]
    raw = float(sum(r.score for r in per_file))
    return {"threshold": threshold, "raw": raw, "normalized": normalized_score(raw, files, profile),
            "files": per_file}


__all__ = [
    "MAX_TP", "PROFILES", "FileScore", "Profile", "ScoringFile", "Sweep", "get_profile", "normalized_score",
    "null_score", "optimize_threshold", "perfect_score", "probationary_length", "profiles_from_json",
    "scaled_sigmoid", "score_corpus", "score_file", "score_flags", "sweep",
]
