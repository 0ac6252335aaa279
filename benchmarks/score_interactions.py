"""How much of a trained simulator model's score is interaction of three or more fields? (label-free)

Superset importance (Liu & Owen, "Estimating mean dimensionality of analysis of variance
decompositions", JASA 2006): for a set T of field blocks, Y_T = E[(sum over subsets v of T of
(-1)^|T - v| f(x with the blocks in v taken from a donor row z))^2] / 2^|T| is the variance of
every ANOVA component of f that involves all of T. The alternating sum cancels every component that
misses a block of T, so a pairwise function has Y_T = 0 for |T| >= 3 exactly, with no sampling noise
from the large main effects. The variance of the components of order >= 3, truncated at order 4,
is Y_3 - 3 Y_4 (Y_k = sum of Y_T over |T| = k); Y_3 alone is an upper bound when order 4 and up are
small.

Why: `ProbabilityIntervals` sees the truth's spread around the score only through pairs of rows
that share fields (benchmarks/interval_identifiability.py), and the simulator's truth has no
interaction of three fields. So whatever high-order part the score has is error that pairs cannot
see. This measures it without labels.

Donor rows are independent draws, except that the city block comes from a row of the same country:
the ad fixes the country, and other countries' cities are off the data's support.

    python -m benchmarks.score_interactions        # the default runs of seeds 7 and 11 (trained once
        # into outputs/benchmarks/) -> benchmarks/results/score_interactions_seed{7,11}.{json,md}
    python -m benchmarks.score_interactions --run outputs/train/runs/<ts>   # -> score_interactions.{json,md}
    python -m benchmarks.score_interactions --run <tiny run> --rows 200 --results-dir /tmp/si   # a trial run
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import (
    fresh_sample,
    load_run,
    parser,
    repo_path,
    simulator_run,
    write_json,
    write_markdown,
)

NAME = "score_interactions"

# the simulator's columns, grouped by the unit that fixes them
SIMULATOR_BLOCKS = {
    "content": ["account_id", "campaign_id", "ad_group_id", "ad_id", "headline", "description", "main_image",
                "budget", "bid"],
    "city": ["country", "state", "city", "latitude", "longitude", "population_density"],
    "placement": ["placement"], "device": ["device"], "age_band": ["age_band"], "gender": ["gender"],
    "hour": ["hour"], "day_of_week": ["day_of_week"],
}


def superset_importance(f: Callable[[pd.DataFrame], np.ndarray], base: pd.DataFrame,
                        donors: Mapping[str, pd.DataFrame], blocks: Mapping[str, list[str]],
                        max_order: int = 4) -> dict:
    """{order: {"total": Y_k, "by_set": {"a x b x c": Y_T}}} for orders 1..max_order. `donors[block]`
    supplies the donor values of that block, row-aligned with `base`."""
    names = list(blocks)
    scores: dict[tuple[str, ...], np.ndarray] = {}

    def score(swapped: tuple[str, ...]) -> np.ndarray:
        key = tuple(sorted(swapped))
        if key not in scores:
            frame = base.copy()
            for b in key:
                for col in blocks[b]:
                    frame[col] = donors[b][col].to_numpy()
            scores[key] = np.asarray(f(frame), dtype=np.float64)
        return scores[key]

    out = {}
    for k in range(1, max_order + 1):
        by_set = {}
        for T in itertools.combinations(names, k):
            d = np.zeros(len(base))
            for r in range(k + 1):
                for v in itertools.combinations(T, r):
                    d += (-1) ** r * score(v)
            by_set[" x ".join(T)] = float(np.mean(d**2) / 2**k)
        out[k] = {"total": float(sum(by_set.values())), "by_set": by_set}
    return out


def high_order_variance(importance: dict) -> dict:
    """Variance of the components of order >= 3: Y_3 - 3 Y_4 (truncated), and Y_3 (upper bound)."""
    y3 = importance[3]["total"]
    y4 = importance.get(4, {"total": 0.0})["total"]
    return {"order3plus": y3 - math.comb(3, 2) * y4, "order3plus_upper": y3}


def interactions(run: Path, rows: int, sample_seed: int) -> dict:
    """Superset importances of a run's score (logits) on `rows` fresh rows of its world, orders 1-4."""
    predictor, metadata = load_run(run)
    start = time.time()
    frame = fresh_sample(metadata, 2 * rows, sample_seed).reset_index(drop=True)
    base, pool = frame.iloc[:rows].reset_index(drop=True), frame.iloc[rows:].reset_index(drop=True)
    rng = np.random.default_rng(sample_seed)
    same_country = np.array([rng.choice(np.flatnonzero(pool["country"].to_numpy() == c))
                             for c in base["country"].to_numpy()])
    donors = {b: pool for b in SIMULATOR_BLOCKS}
    donors["city"] = pool.iloc[same_country].reset_index(drop=True)
    f = lambda df: predictor.logits_with_members(df)[0]
    imp = superset_importance(f, base, donors, SIMULATOR_BLOCKS)
    return {"run": repo_path(run), "rows": rows, "var_score": float(np.var(f(base))),
            "totals": {k: v["total"] for k, v in imp.items()}, **high_order_variance(imp),
            "top": {k: dict(sorted(v["by_set"].items(), key=lambda kv: -kv[1])[:6]) for k, v in imp.items()},
            "seconds": time.time() - start}


def markdown(result: dict) -> str:
    lines = [f"# Interactions in the score of {result['run']} ({result['rows']} rows, label-free)", "",
             f"- variance of the score (logit): {result['var_score']:.4f}",
             f"- components of order >= 3: **{result['order3plus']:.4f}** (upper bound {result['order3plus_upper']:.4f})",
             "", "| order | sum of superset importances | largest sets |", "| --- | --- | --- |"]
    for k, v in result["top"].items():
        top = ", ".join(f"{name} {val:.4f}" for name, val in list(v.items())[:3])
        lines.append(f"| {k} | {result['totals'][k]:.4f} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", type=Path, help="a simulator run directory (holds bundle/); default: --seeds' default runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 11], help="without --run: the default runs of these seeds")
    ap.add_argument("--rows", type=int, default=2000, help="base rows (each costs 2^4 scorings per set of 4)")
    ap.add_argument("--sample-seed", type=int, default=4242)
    args = ap.parse_args()
    jobs = [(NAME, args.run)] if args.run else [(f"{NAME}_seed{s}", simulator_run(s)) for s in args.seeds]
    for name, run in jobs:
        result = interactions(run, args.rows, args.sample_seed)
        print(f"wrote {write_json(name, result, args.results_dir)}")
        write_markdown(name, markdown(result), args.results_dir)
        print(markdown(result))


if __name__ == "__main__":
    main()
