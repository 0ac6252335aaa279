"""Empirical privacy audits of a trained model.

- `membership_auc`: loss-threshold membership inference (Yeom et al., 2018): score each row by
  its negative loss; AUC of members (training rows) vs non-members (held-out rows), with a
  percentile bootstrap confidence interval (Efron & Tibshirani, 1993).
- `one_run_lower_bound`: the one-run audit of Steinke, Nasr & Jagielski (NeurIPS 2023).
  m canary rows are drawn from the training data and each is kept in training with
  probability 1/2 (independently, secretly). After training the auditor guesses "in" for the
  k best-scored canaries, "out" for the k worst, and abstains on the rest. Under
  epsilon-DP the number of correct guesses W among r = 2k guesses is stochastically dominated by
  Binomial(r, e^eps / (1 + e^eps)) (their Theorem 3.1 with delta = 0), so the largest eps for
  which P[Binomial >= W] <= beta is a lower bound on the true epsilon with confidence 1 - beta.
  Several k are tried with a Bonferroni split of beta, so picking the best k stays valid.
  The delta term of their theorem is left out (delta <= 1/(10 N) moves the tail by a
  negligible amount at these m), so the bound is for the pure-epsilon part.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney U form of the ROC AUC."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUC needs both classes; got {len(pos)} members and {len(neg)} non-members")
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def membership_auc(
    member_losses: np.ndarray, nonmember_losses: np.ndarray, n_boot: int = 200, confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Loss-threshold MIA: AUC that lower loss means 'member', with a bootstrap CI.

    Returns {auc, auc_low, auc_high, n_members, n_nonmembers}. AUC 0.5 = no leakage seen.
    """
    mem, non = -np.asarray(member_losses, float), -np.asarray(nonmember_losses, float)
    auc = roc_auc(mem, non)
    rng = np.random.default_rng(seed)
    boots = [
        roc_auc(mem[rng.integers(0, len(mem), len(mem))], non[rng.integers(0, len(non), len(non))])
        for _ in range(int(n_boot))
    ]
    alpha = (1.0 - confidence) / 2.0
    low, high = (np.quantile(boots, [alpha, 1 - alpha]) if boots else (auc, auc))
    return {"auc": auc, "auc_low": float(low), "auc_high": float(high),
            "n_members": len(mem), "n_nonmembers": len(non)}


def draw_canaries(n_train: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(canary row indices, included flags): m distinct training rows, each kept with prob 1/2."""
    m = min(int(m), int(n_train))
    rng = np.random.default_rng([seed, 0xCA4A])
    rows = np.sort(rng.choice(n_train, size=m, replace=False))
    return rows, rng.random(m) < 0.5


def epsilon_lower_bound(correct: int, guesses: int, beta: float) -> float:
    """Largest eps with P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= beta (0 if none)."""
    if guesses == 0:
        return 0.0

    def tail(eps: float) -> float:
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(stats.binom.sf(correct - 1, guesses, p))

    if tail(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= beta and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= beta else (lo, mid)
    return lo


def one_run_lower_bound(
    scores: np.ndarray, included: np.ndarray, beta: float = 0.05, fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.5),
) -> dict[str, float]:
    """Steinke et al. (2023) one-run epsilon lower bound from canary scores (higher = 'in').

    `fractions`: guesses per side as a fraction of m; each gets beta / len(fractions).
    """
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for f in fractions:
        k = int(m * f / 2)
        if k < 1:
            continue
        top, bottom = order[:k], order[m - k:]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_lower_bound(correct, 2 * k, beta / len(fractions))
        if eps > best["epsilon_lower_bound"] or best["guesses"] == 0:
            best = {"epsilon_lower_bound": eps, "guesses": 2 * k, "correct": correct}
    best.update(canaries=int(m), beta=float(beta), canary_auc=roc_auc(scores[included], scores[~included])
                if included.any() and (~included).any() else float("nan"))
    return best
