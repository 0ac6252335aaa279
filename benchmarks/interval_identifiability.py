"""How much of the truth's spread around a trained model can the interval fit see, and how noisily?

`ProbabilityIntervals` sizes its intervals with tau^2, the variance of the true logit around a + b s,
estimated from click-residual products of held-out row pairs that share a unit (fields and pairs of
fields). Two things decide whether its coverage of true_ctr lands near 1 - alpha:

1. Seen share (no label noise): the same moment equations solved on the TRUE residual l - (a + b s)
   give the part of its variance that they attribute to field and field-pair effects. Closed
   indices (`closed_index_variance`) on the same residual, with each cell weighted per pair (as the
   moments are) or per row (as the population is), show where the rest goes: pair weighting counts
   a cell with the square of its rows, and the model's error is smaller on busy ads. (The model's
   own interactions of three or more fields are small: benchmarks/score_interactions.py.)
2. Moment noise: labels redrawn from true_ctr on fit sets of several sizes; the spread of the
   estimates, the mean analytic `tau2_se`, and the coverage each estimate gives on held-out rows.

It needs a trained simulator run (its bundle) and draws fresh impressions of the same world
(`sample_seed`), so none of the rows was used to train or fit the run.

3. With `--partner <run>`, a second run of the same world trained on an INDEPENDENT sample
   (`data.source.sample_seed=<other>`): the covariance of the two models' true residuals is their
   shared (approximation) error, the rest is each model's estimation noise from its own training
   labels; and the seen share of their average says whether averaging away the noise leaves an
   error that pairs can see.

    python -m benchmarks.interval_identifiability            # the default runs of seeds 7 and 11
        # (trained once into outputs/benchmarks/, with partners on sample seed + 1000)
        # -> benchmarks/results/interval_identifiability_seed{7,11}.{json,md}
    python -m benchmarks.interval_identifiability --run outputs/train/runs/<ts> [--partner <run>]
        # any simulator run -> interval_identifiability.{json,md}; a partner: train.py seed=7
        # data.source.sample_seed=1007 hydra.run.dir=outputs/partner
"""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    fresh_sample,
    load_run,
    parser,
    repo_path,
    simulator_run,
    write_json,
    write_markdown,
)

NAME = "interval_identifiability"


def seen_share(resid_true: np.ndarray, fields: dict[str, np.ndarray], pairs: bool = True) -> dict:
    """Variance of the true residual, and the part the crossed field (+ pair) effects account for."""
    from within.calibration.intervals import crossed_error_variance

    r = np.asarray(resid_true, dtype=np.float64)
    r = r - r.mean()
    comps, _ = crossed_error_variance(r, np.ones_like(r), fields, pairs=pairs)
    seen = float(sum(comps.values()))
    total = float(r.var())
    top = dict(sorted(((k, v) for k, v in comps.items() if v > 0), key=lambda kv: -kv[1])[:8])
    return {"var_true_resid": total, "seen_by_keys": seen, "seen_share": seen / total if total > 0 else float("nan"),
            "top_components": top}


def closed_index_variance(x: np.ndarray, fields: dict[str, np.ndarray], row_weighted: bool = True) -> float:
    """The variance of x as a sum of field and field-pair effects, from closed indices.

    C(K) is the mean of x_i x_j over row pairs that share the fields K: for independent fields this
    is the variance of E[x | fields K] (pick-freeze), so for d fields and no effect of three or more
    Var(x) = sum over pairs C(jk) - (d - 2) sum over fields C(j) (x centred). With `row_weighted`
    each cell's pair mean counts with its rows, as the population does. Without it every pair counts
    once, so a cell counts with n_c^2 (as in the pair moments of ProbabilityIntervals): where a
    cell's effect changes with its size (a high bid buys traffic AND clicks; a busy ad had more
    training rows, so a smaller error) that biases the sum toward the busy cells."""
    from within.calibration.intervals import pair_codes

    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    names = list(fields)

    def c(key: tuple[str, ...]) -> float:
        code = fields[key[0]]
        for f in key[1:]:
            code = pair_codes(code, fields[f])
        k = int(code.max()) + 1
        n = np.bincount(code, minlength=k).astype(np.float64)
        pair_sum = np.bincount(code, x, k) ** 2 - np.bincount(code, x * x, k)
        ok = n >= 2
        if not ok.any():
            return 0.0
        if row_weighted:
            return float((pair_sum[ok] / (n[ok] - 1)).sum() / n[ok].sum())
        return float(pair_sum[ok].sum() / (n[ok] * (n[ok] - 1)).sum())

    d = len(names)
    return (sum(c(key) for key in itertools.combinations(names, 2))
            - (d - 2) * sum(c((f,)) for f in names))


def partner_comparison(s_main: np.ndarray, s_partner: np.ndarray, true_logit: np.ndarray, y: np.ndarray,
                       keys: dict[str, np.ndarray], fields: dict[str, np.ndarray], weight_power: float) -> dict:
    """Split the run's error into a part shared with a model trained on independent data (approximation
    error) and a part of its own (estimation noise), and measure what pairs see of the averaged model's
    error. Each model's a, b come from its own fit on the observed labels, as in a run."""
    from within.calibration.intervals import ProbabilityIntervals

    resid = {}
    for name, s in (("run", s_main), ("partner", s_partner), ("average", (s_main + s_partner) / 2)):
        fit = ProbabilityIntervals(weight_power=weight_power, max_fit_rows=10**8).fit(s, y, keys=keys)
        resid[name] = true_logit - (fit.params_["a"] + fit.params_["b"] * s)
    c = np.cov(resid["run"], resid["partner"])
    average = seen_share(resid["average"], fields)
    return {"var_run": float(c[0, 0]), "var_partner": float(c[1, 1]), "cov_shared": float(c[0, 1]),
            "shared_share": float(c[0, 1] / math.sqrt(c[0, 0] * c[1, 1])),
            "var_average": average["var_true_resid"], "seen_share_average": average["seen_share"]}


def sample_seed_of(metadata: dict) -> tuple[int, int]:
    """(world seed, sample seed) of a simulator run."""
    source = metadata["config"]["data"]["source"]
    seed = int(source["seed"])
    return seed, seed if source.get("sample_seed") is None else int(source["sample_seed"])


def identifiability(run: Path, partner_run: Path | None, sizes: list[int], n_eval: int, redraws: int,
                    sample_seed: int, alpha: float) -> dict:
    """The seen share, closed indices, partner split and moment-noise sweep of one run."""
    from scipy.special import logit

    from within.calibration.intervals import ProbabilityIntervals, coverage, finest_fields
    from within.postfit.intervals import CONTENT_KEY, interval_keys

    predictor, metadata = load_run(run)
    settings = metadata["config"].get("intervals", {})
    partner = None
    if partner_run is not None:
        partner, partner_meta = load_run(partner_run, "--partner")
        (world, rows_seed), (p_world, p_rows_seed) = sample_seed_of(metadata), sample_seed_of(partner_meta)
        if world != p_world or rows_seed == p_rows_seed:
            raise SystemExit(f"--partner: needs the same world (seed {world}) trained on other rows; it has seed {p_world} "
                             f"and sample seed {p_rows_seed} (run: {rows_seed}). Train it with "
                             f"seed={world} data.source.sample_seed=<another value>")
    weight_power = float(settings.get("weight_power", 0.5))
    start = time.time()
    frame = fresh_sample(metadata, sizes[-1] + n_eval, sample_seed)
    logits, _ = predictor.logits_with_members(frame)
    s = np.asarray(logits, dtype=np.float64)
    truth = frame[predictor.spec.truth].to_numpy(dtype=np.float64)
    fit_rows, eval_rows = np.arange(sizes[-1]), np.arange(sizes[-1], len(frame))
    keys = interval_keys(predictor, frame)
    y_fit = frame[predictor.spec.label].to_numpy()[fit_rows]  # the observed labels
    fit_keys = {k: v[fit_rows] for k, v in keys.items()}

    # 1. seen share, on the fit rows with a, b from the largest observed-label fit
    reference = ProbabilityIntervals(weight_power=weight_power, max_fit_rows=10**8).fit(
        s[fit_rows], y_fit, keys=fit_keys)
    a, b = reference.params_["a"], reference.params_["b"]
    resid = logit(np.clip(truth, 1e-9, 1 - 1e-9)) - (a + b * s)
    fields = finest_fields(fit_keys, len(fit_rows))
    results = {"run": repo_path(run), "rows_fresh": len(frame), "sample_seed": sample_seed,
               "weight_power": weight_power, "alpha": alpha,
               "oracle": seen_share(resid[fit_rows], fields),
               "oracle_fields_only": seen_share(resid[fit_rows], fields, pairs=False)["seen_share"]}
    # the same question with closed indices, pairs counted once (n_c^2 per cell) or per row
    total = results["oracle"]["var_true_resid"]
    results["oracle"]["closed_index_share_pair_weighted"] = closed_index_variance(resid[fit_rows], fields, False) / total
    results["oracle"]["closed_index_share_row_weighted"] = closed_index_variance(resid[fit_rows], fields, True) / total
    # why pair weighting misses part of it: the model's error by its ad's traffic (rows per content)
    content = fields.get(CONTENT_KEY)
    if content is not None:
        traffic = np.bincount(content)[content]
        quartile = np.searchsorted(np.quantile(traffic, [0.25, 0.5, 0.75]), traffic, side="right")
        results["oracle"]["resid_var_by_ad_traffic_quartile"] = [
            float(resid[fit_rows][quartile == q].var()) for q in range(4)]
    true_logit = logit(np.clip(truth[fit_rows], 1e-9, 1 - 1e-9))
    results["oracle"]["truth_itself"] = {  # a sum of field and pair effects by construction
        "var": float(true_logit.var()), "seen_by_keys": seen_share(true_logit, fields)["seen_by_keys"],
        "closed_index_pair_weighted": closed_index_variance(true_logit, fields, False),
        "closed_index_row_weighted": closed_index_variance(true_logit, fields, True)}
    if partner is not None:
        s_partner = np.asarray(partner.logits_with_members(frame)[0], dtype=np.float64)
        results["partner"] = {"run": repo_path(partner_run), **partner_comparison(
            s[fit_rows], s_partner[fit_rows], logit(np.clip(truth[fit_rows], 1e-9, 1 - 1e-9)), y_fit, fit_keys,
            fields, weight_power)}
        print(json.dumps(results["partner"]), flush=True)
    # the coverage a perfectly known, constant spread would give (the Gaussian-logit shape alone)
    oracle_fixed = ProbabilityIntervals(residual_var=float(resid[fit_rows].var())).fit(
        s[fit_rows], y_fit)
    _, lo, hi = oracle_fixed.interval(s[eval_rows], alpha)
    results["oracle"]["coverage_with_true_variance"] = coverage(lo, hi, truth[eval_rows])

    # 2. moment noise over label redraws
    rng = np.random.default_rng(sample_seed)
    results["sweep"] = []
    for n in sizes:
        rows = fit_rows[:n]
        est = []
        for _ in range(redraws):
            y = (rng.random(n) < truth[rows]).astype(np.float64)
            fit = ProbabilityIntervals(weight_power=weight_power, max_fit_rows=10**8).fit(
                s[rows], y, keys={k: v[rows] for k, v in keys.items()})
            _, lo, hi = fit.interval(s[eval_rows], alpha)
            est.append((fit.params_["tau2"], fit.params_["tau2_se"], coverage(lo, hi, truth[eval_rows])))
        e = np.array(est)
        results["sweep"].append({"fit_rows": n, "tau2_mean": float(e[:, 0].mean()), "tau2_sd": float(e[:, 0].std(ddof=1)),
                                 "tau2_se_mean": float(e[:, 1].mean()), "coverage_mean": float(e[:, 2].mean()),
                                 "coverage_sd": float(e[:, 2].std(ddof=1)), "coverages": e[:, 2].round(4).tolist()})
        print(json.dumps(results["sweep"][-1]), flush=True)
    results["seconds"] = time.time() - start
    return results


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", type=Path, help="a simulator run directory (holds bundle/); default: --seeds' default runs")
    ap.add_argument("--partner", type=Path,
                    help="with --run: a run of the same world trained on another data.source.sample_seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 11],
                    help="without --run: the default runs of these seeds and their partners (sample seed + 1000)")
    ap.add_argument("--sizes", default="80000,160000,320000,480000", help="fit-set sizes (rows)")
    ap.add_argument("--eval-rows", type=int, default=160_000, help="held-out rows that score coverage")
    ap.add_argument("--redraws", type=int, default=5, help="label redraws per size")
    ap.add_argument("--sample-seed", type=int, default=999)
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args()
    if args.partner and not args.run:
        raise SystemExit("--partner: needs --run (without --run each default run gets its own partner)")
    jobs = ([(NAME, args.run, args.partner)] if args.run else
            [(f"{NAME}_seed{s}", simulator_run(s), simulator_run(s, sample_seed=s + 1000)) for s in args.seeds])
    sizes = sorted(int(x) for x in args.sizes.split(","))
    for name, run, partner in jobs:
        results = identifiability(run, partner, sizes, args.eval_rows, args.redraws, args.sample_seed, args.alpha)
        print(f"wrote {write_json(name, results, args.results_dir)}")
        write_markdown(name, markdown(results), args.results_dir)
        print(markdown(results))


def markdown(r: dict) -> str:
    o = r["oracle"]
    lines = [
        f"# Interval identifiability ({r['run']}, fresh sample seed {r['sample_seed']}, weight_power {r['weight_power']})",
        "",
        (f"- variance of the true logit around a + b s: **{o['var_true_resid']:.4f}**; with it known exactly, the "
        f"Gaussian-logit intervals cover **{o['coverage_with_true_variance']:.3f}** at alpha {r['alpha']}"),
        (f"- seen by field and field-pair effects (true residuals, no label noise): {o['seen_by_keys']:.4f} = "
        f"**{o['seen_share']:.0%}** (fields alone: {r['oracle_fields_only']:.0%})"),
    ]
    if "closed_index_share_row_weighted" in o:
        t = o["truth_itself"]
        if "resid_var_by_ad_traffic_quartile" in o:
            lines.append("- variance of the true residual by the ad's traffic quartile (quietest first): "
                         + ", ".join(f"{v:.3f}" for v in o["resid_var_by_ad_traffic_quartile"]))
        lines += [
            (f"- closed indices on the same residual: {o['closed_index_share_pair_weighted']:.0%} with every pair "
             f"counted once (busy cells weigh n_c^2), **{o['closed_index_share_row_weighted']:.0%}** with each cell "
             f"weighted by its rows"),
            (f"- the truth itself (a sum of field and pair effects by construction), variance {t['var']:.4f}: pair "
             f"moments {t['seen_by_keys']:.4f}, closed indices {t['closed_index_pair_weighted']:.4f} (pairs) and "
             f"**{t['closed_index_row_weighted']:.4f}** (rows)"),
        ]
    if "partner" in r:
        p = r["partner"]
        lines += [
            (f"- against a partner trained on an independent sample ({p['run']}): the two errors share "
             f"{p['cov_shared']:.4f} of {p['var_run']:.4f} / {p['var_partner']:.4f} (correlation **{p['shared_share']:.2f}**); "
             f"the rest is each model's own estimation noise"),
            (f"- their average: error variance {p['var_average']:.4f}, of which pairs see **{p['seen_share_average']:.0%}**"),
        ]
    lines += [
        "",
        "| fit rows | tau^2 over label redraws | mean analytic se | coverage of true_ctr |",
        "| --- | --- | --- | --- |",
    ]
    for row in r["sweep"]:
        lines.append(f"| {row['fit_rows']:,} | {row['tau2_mean']:.4f} ± {row['tau2_sd']:.4f} | {row['tau2_se_mean']:.4f} | "
                     f"{row['coverage_mean']:.3f} ± {row['coverage_sd']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
