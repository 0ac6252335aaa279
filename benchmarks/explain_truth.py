"""Do a trained network's SHAP field rankings agree with the simulator's known effects?

Per world seed:

1. train `model=nn` through the real pipeline (`run_train`: `data.source.n` rows, `trainer.max_epochs`
   epochs, the default network; post-fit `calibrate, export`) and load its bundle;
2. draw fresh impressions of the same world (another `sample_seed`): `background` rows are the
   reference, `rows` other random rows (from the whole timeline) are explained;
3. model: `within.explain.explain` (expected gradients over the embedded inputs, the wide term
   exact), one attribution per raw field and row;
4. truth: `AdMarketSimulator.true_logit_terms` split into fields by their exact interventional
   Shapley values against the same background (`within.explain.truth.field_shapley`): a one-field
   term goes to its field, an interaction term (device x placement, age x text topic, image warmth
   x placement) is shared by Shapley's rule, e.g. half of a two-field table's pure interaction to
   each field;
5. Spearman over the network's input fields between the model's global importance (mean
   |attribution|) and the truth's field-effect variance (var over rows of the field's Shapley
   value). Inputs without a true effect (budget, country, latitude, longitude) have truth 0 (tied
   last). The truth's campaign effect has no input field (campaign_id is not embedded); it is
   listed apart, and the model can only carry it through proxies (budget, text, image).

Three versions of the Spearman are reported, because six input fields describe one unit, the
user's city (country, state, city, latitude, longitude, population_density): the truth keys its
regional effects by state and city, but they are smooth fields over the coordinates, and the
network learns much of them from latitude / longitude. Independent masking then moves a row's
coordinates to another country's while its city stays, off the data's support, where the
network's response is large (the permutation explainer gives the same: it is the model, not
the sampler). So: (a) raw input fields; (b) the six merged into one `region` field (a group's
attribution is the sum of its fields', on both sides); (c) only the fields with a true effect.

Also reported: Spearman against the truth's mean |Shapley| (like for like) and between the two
variances; the additivity gap of the expected gradients; and the explainer's own noise (the same
model re-explained with other background draws and Monte Carlo seeds).

    python -m benchmarks.explain_truth                  # 5 seeds, 200k rows, 3 epochs (~1 h on 2 shared cores)
    python -m benchmarks.explain_truth --seeds 0 1 --rows 60000 --epochs 1 --name explain_truth_quick

Resumable: seeds already in the JSON are skipped (`--force` reruns them). torch runs on one thread
(`--threads`): on the shared 2-core machine two threads were ~10x slower for the explainer.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import RESULTS, compose, machine, write_json

# One unit, the user's city, in six fields: the network can carry the regional effect (a smooth field
# over the coordinates) on latitude / longitude, which the truth keys by state and city.
REGION = {"region": ["country", "state", "city", "latitude", "longitude", "population_density"]}


def load_bundle(path: Path) -> Any:
    """The fitted model in a bundle (the one place this benchmark names the inference class)."""
    from within.models.base import BaseMLModel

    return BaseMLModel.load(path)


def train_model(seed: int, rows: int, epochs: int, out: Path) -> Any:
    from within.pipeline.train import run_train

    cfg = compose([f"seed={seed}", f"data.source.n={rows}", f"trainer.max_epochs={epochs}", "postfit=[calibrate,export]",
                   "export.onnx=false", "extras.print_config=false", "logger=csv"], out_dir=out)
    run_train(cfg)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    return load_bundle(out / "bundle"), {k: metrics[k] for k in ("test/auc", "test/oracle_auc", "test/ece_true")
                                              if k in metrics}


def explain_one(model: Any, sim: Any, fresh: pd.DataFrame, n_rows: int, background: int, nsamples: int,
                seed: int) -> dict[str, Any]:
    """Model and truth attributions of `n_rows` random fresh rows against `background` others."""
    from within.explain import explain
    from within.explain.explanation import merge_columns
    from within.explain.truth import field_shapley, rank_agreement

    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(fresh))
    rows = fresh.iloc[pick[:n_rows]].reset_index(drop=True)
    ref = fresh.iloc[pick[n_rows:n_rows + background]].reset_index(drop=True)
    t0 = time.perf_counter()
    e = explain(model, rows, ref, nsamples=nsamples, background_size=background, seed=seed)
    explain_s = time.perf_counter() - t0
    phi = field_shapley(sim.true_logit_terms, rows, ref)
    fields = [f for f in e.feature_names if ":" not in f]
    model_attr = e.to_frame()[fields]
    truth = phi.reindex(columns=fields, fill_value=0.0)
    imp, imp_var = model_attr.abs().mean(), model_attr.var()
    truth_var, truth_abs = truth.var(), truth.abs().mean()
    spread = np.abs(e.logits - e.base_value)
    region_model, region_truth = merge_columns(model_attr, REGION), merge_columns(truth, REGION)
    effects = [f for f in fields if truth_var[f] > 0]
    return {
        "spearman_region_merged": rank_agreement(region_model.abs().mean(), region_truth.var())["spearman"],
        "spearman_fields_with_true_effect": rank_agreement(imp[effects], truth_var[effects])["spearman"],
        "spearman_importance_vs_truth_variance": rank_agreement(imp, truth_var)["spearman"],
        "spearman_importance_vs_truth_mean_abs": rank_agreement(imp, truth_abs)["spearman"],
        "spearman_variance_vs_truth_variance": rank_agreement(imp_var, truth_var)["spearman"],
        "n_fields": len(fields),
        "additivity_gap_mean_abs": float(np.abs(e.additivity_gap).mean()),
        "logit_spread_mean_abs": float(spread.mean()),
        "explain_seconds": explain_s,
        "fields": {f: {"model_mean_abs": float(imp[f]), "model_var": float(imp_var[f]),
                       "truth_var": float(truth_var[f]), "truth_mean_abs": float(truth_abs[f])} for f in fields},
        "region": {"model_mean_abs": float(region_model["region"].abs().mean()),
                   "truth_var": float(region_truth["region"].var()),
                   "truth_mean_abs": float(region_truth["region"].abs().mean())},
        "truth_without_input_field": {f: float(phi[f].var()) for f in phi.columns if f not in fields},
    }


def fidelity(model: Any, fresh: pd.DataFrame, n_rows: int, seed: int) -> dict[str, Any]:
    """Expected gradients against the exactly additive permutation explainer on the same rows and
    background (50 rows, 6 permutations): how much of the disagreement with the truth is the sampler's."""
    from within.explain import explain
    from within.explain.truth import rank_agreement

    pick = np.random.default_rng(seed + 7).permutation(len(fresh))
    rows = fresh.iloc[pick[:n_rows]].reset_index(drop=True)
    ref = fresh.iloc[pick[n_rows:n_rows + 50]].reset_index(drop=True)
    g = explain(model, rows, ref, method="gradient", background_size=50, seed=seed).to_frame()
    fields = [f for f in g.columns if ":" not in f]
    p = explain(model, rows, ref, method="permutation", permutations=6, background_size=50, seed=seed).to_frame()[fields]
    g = g[fields]
    return {"rows": n_rows, "spearman_importance": rank_agreement(g.abs().mean(), p.abs().mean())["spearman"],
            "correlation_of_attributions": float(np.corrcoef(g.to_numpy().ravel(), p.to_numpy().ravel())[0, 1]),
            "mean_abs_difference": float((g - p).abs().to_numpy().mean()),
            "mean_abs_permutation_attribution": float(p.abs().to_numpy().mean())}


def run_seed(seed: int, args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    from within.data.simulator import AdMarketSimulator

    with tempfile.TemporaryDirectory(prefix=f"explain_truth_{seed}_") as tmp:
        t0 = time.perf_counter()
        model, test_metrics = train_model(seed, args.rows, args.epochs, Path(tmp))
        train_s = time.perf_counter() - t0
    sim = AdMarketSimulator(seed=seed, sample_seed=seed + 10_000)
    fresh = sim.sample(args.fresh)
    result = explain_one(model, sim, fresh, args.explain_rows, args.background, args.nsamples, seed)
    result.update(test_metrics=test_metrics, train_seconds=train_s)
    if repeats > 1 and args.fidelity_rows:
        result["fidelity_vs_permutation"] = fidelity(model, fresh, args.fidelity_rows, seed)
    if repeats > 1:  # the explainer's own noise on this one model
        result["explainer_repeats"] = [
            explain_one(model, sim, fresh, args.explain_rows, args.background, args.nsamples, seed + 100 * r)[
                "spearman_importance_vs_truth_variance"] for r in range(1, repeats)]
    return result


KEYS = ("spearman_importance_vs_truth_variance", "spearman_region_merged", "spearman_fields_with_true_effect",
        "spearman_importance_vs_truth_mean_abs", "spearman_variance_vs_truth_variance", "additivity_gap_mean_abs",
        "logit_spread_mean_abs")


def summarise(seeds: dict[str, Any]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        v = np.asarray(values, dtype=np.float64)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": len(v)}

    out = {k: stat([r[k] for r in seeds.values()]) for k in KEYS}
    sds = [np.std([r["spearman_importance_vs_truth_variance"], *r["explainer_repeats"]], ddof=1)
           for r in seeds.values() if r.get("explainer_repeats")]
    if sds:
        out["explainer_noise_sd_within_model"] = {"mean": float(np.mean(sds)), "n_models": len(sds)}
    fields = list(next(iter(seeds.values()))["fields"])
    out["fields"] = {f: {k: float(np.mean([r["fields"][f][k] for r in seeds.values()]))
                         for k in ("model_mean_abs", "truth_var", "truth_mean_abs")} for f in fields}
    out["region"] = {k: float(np.mean([r["region"][k] for r in seeds.values()]))
                     for k in ("model_mean_abs", "truth_var", "truth_mean_abs")}
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    main = s["spearman_importance_vs_truth_variance"]
    lines = [
        f"# explain_truth: SHAP field ranking vs the simulator's truth ({main['n']} seeds)", "",
        (f"Setup: {result['config']['rows']} rows, {result['config']['epochs']} epochs, default network; "
         f"{result['config']['explain_rows']} explained rows against {result['config']['background']} background "
         f"rows, {result['config']['nsamples']} expected-gradient samples per row. Shared 2-core machine."), "",
        "| statistic | mean | sd |", "| --- | --- | --- |",
    ]
    for key in KEYS:
        lines.append(f"| {key} | {s[key]['mean']:.3f} | {s[key]['sd']:.3f} |")
    if "explainer_noise_sd_within_model" in s:
        lines.append(f"| explainer noise (sd of Spearman, same model) | "
                     f"{s['explainer_noise_sd_within_model']['mean']:.3f} | |")
    fid = next((r["fidelity_vs_permutation"] for r in result["seeds"].values() if "fidelity_vs_permutation" in r), None)
    if fid:
        lines += ["", (f"Sampler check (first seed's model, {fid['rows']} rows, 50 background rows): expected gradients vs "
                       f"the exactly additive permutation explainer: Spearman of field importance "
                       f"{fid['spearman_importance']:.3f}, correlation of attributions "
                       f"{fid['correlation_of_attributions']:.3f}, mean |difference| {fid['mean_abs_difference']:.4f} "
                       f"against a mean |attribution| of {fid['mean_abs_permutation_attribution']:.4f}.")]
    region = s["spearman_region_merged"]

    def verdict(v: dict[str, float]) -> str:
        return ("met" if v["mean"] >= 0.8 else "NOT met") + f" ({v['mean']:.3f} +- {v['sd']:.3f})"

    lines += ["", (f"Acceptance, Spearman >= 0.8 (mean over seeds): on the raw input fields {verdict(main)}; with "
                   f"the city's six fields merged into `region` ({', '.join(REGION['region'])}) {verdict(region)}."), "",
              "| field | model mean abs attribution | truth variance | truth mean abs |", "| --- | --- | --- | --- |"]
    for f, v in sorted(s["fields"].items(), key=lambda kv: -kv[1]["truth_var"]):
        lines.append(f"| {f} | {v['model_mean_abs']:.4f} | {v['truth_var']:.4f} | {v['truth_mean_abs']:.4f} |")
    r = s["region"]
    lines.append(f"| region (merged) | {r['model_mean_abs']:.4f} | {r['truth_var']:.4f} | {r['truth_mean_abs']:.4f} |")
    lines += ["", "Per seed: " + ", ".join(f"seed {k}: {v['spearman_importance_vs_truth_variance']:.3f}"
                                           for k, v in result["seeds"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fresh", type=int, default=20_000, help="fresh impressions drawn for rows + background")
    ap.add_argument("--explain-rows", type=int, default=400)
    ap.add_argument("--background", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="explanations of the first seed's model (explainer noise)")
    ap.add_argument("--fidelity-rows", type=int, default=20,
                    help="rows the first seed's model also explains with the permutation explainer (0: skip)")
    ap.add_argument("--redo", type=int, nargs="*", default=[], help="seeds to run again although present")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="explain_truth")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.name}.json"
    result = json.loads(path.read_text()) if path.exists() and not args.force else {"seeds": {}}
    config = {k: getattr(args, k) for k in ("rows", "epochs", "fresh", "explain_rows", "background", "nsamples")}
    if result.get("config") not in (None, config):
        raise SystemExit(f"{path} was written with {result['config']}; use --name for other settings or --force")
    result.update(config=config, machine=machine())
    for i, seed in enumerate(args.seeds):
        if str(seed) in result["seeds"] and seed not in args.redo:
            continue
        result["seeds"][str(seed)] = run_seed(seed, args, repeats=args.repeats if i == 0 else 1)
        result["summary"] = summarise(result["seeds"])
        write_json(args.name, result)  # after every seed: nothing lost on a crash
        (RESULTS / f"{args.name}.md").write_text(markdown(result))
        print(f"seed {seed}: spearman {result['seeds'][str(seed)]['spearman_importance_vs_truth_variance']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
