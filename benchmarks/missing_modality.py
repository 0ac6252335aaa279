"""Missing-modality ablation on the simulator: train with 30% of images and 30% of text dropped.

For each seed in ``--seeds`` (it builds the world, draws the rows and inits the model), two runs of
the real training pipeline (model=nn, data=synthetic with ``--rows`` rows, same split, post-fit
``calibrate``):

* ``full``: trained on complete records;
* ``dropped``: trained with ``data.drop_modality={text: 0.3, image: 0.3}``: on the train, val and
  calib splits each row independently loses its text (empty string) with probability 0.3 and its
  image (None) with probability 0.3, which the processor turns into ``mask_text`` / ``mask_image``
  False (the model's learned stand-in vector, masked out of CrossModalAttention).

Both models are scored on the same test rows (the last 20% in time), as served by
the bundle's ``predict`` on DataFrames:

* ``full``: complete test records;
* ``partial_mix``: the test records with the same random 30% / 30% drop (AUC over all rows);
* ``partial_only``: only the test rows of ``partial_mix`` that lost at least one modality;
* ``no_text`` / ``no_image`` / ``tabular_only``: every test row without text / image / both.

Writes benchmarks/results/missing_modality.{json,md}: per-seed AUCs and calibration ratios, and the
mean AUC over seeds per (trained on, tested on) cell; the JSON is rewritten after every seed.

    python -m benchmarks.missing_modality                 # 200k rows, seeds 7 and 8
    python -m benchmarks.missing_modality --table         # rewrite the markdown from the JSON
    python -m benchmarks.missing_modality --rows 6000 --epochs 1 --seeds 7 --results-dir /tmp/mm   # a trial run
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import machine, parser, read_json, train, write_json, write_markdown

NAME = "missing_modality"
RATES = {"text": 0.3, "image": 0.3}


def test_variants(test: pd.DataFrame, spec: Any, seed: int) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Named (frame, row mask) pairs: which test rows each metric is computed on."""
    from within.data.datamodule import drop_modalities

    every = np.ones(len(test), dtype=bool)
    mixed = drop_modalities({"test": test}, spec, RATES, seed + 1, splits=("test",))["test"]
    lost = np.zeros(len(test), dtype=bool)
    for f in spec.text:
        lost |= (mixed[f.name] == "").to_numpy()
    for f in spec.image:
        lost |= mixed[f.name].isna().to_numpy()
    no_text = drop_modalities({"test": test}, spec, {"text": 1.0}, seed, splits=("test",))["test"]
    no_image = drop_modalities({"test": test}, spec, {"image": 1.0}, seed, splits=("test",))["test"]
    tab_only = drop_modalities({"test": test}, spec, {"text": 1.0, "image": 1.0}, seed, splits=("test",))["test"]
    return {"full": (test, every), "partial_mix": (mixed, every), "partial_only": (mixed, lost),
            "no_text": (no_text, every), "no_image": (no_image, every), "tabular_only": (tab_only, every)}


def one_seed(rows: int, seed: int, epochs: int | None, work: Path) -> dict[str, Any]:
    """Train `full` and `dropped` on one seed's world; AUC and calibration ratio of both on every test variant."""
    from within.calibration.metrics import auc, calibration_ratio

    base = ["data=synthetic", f"data.source.n={rows}", f"seed={seed}", "postfit=[calibrate,export]", "export.onnx=false",
            *([f"trainer.max_epochs={epochs}"] if epochs else [])]
    drop = "+data.drop_modality={" + ",".join(f"{k}:{v}" for k, v in RATES.items()) + "}"
    runs = {"full": train(base, work / f"full_{seed}"), "dropped": train([*base, drop], work / f"dropped_{seed}")}
    test = runs["full"].frames()["test"]  # drop_modality leaves test whole: the same rows for both
    spec = runs["full"].model.spec
    variants = test_variants(test, spec, seed)
    y = test[spec.label].to_numpy(dtype=float)
    result: dict[str, Any] = {
        "rows": rows, "seed": seed, "epochs": epochs, "drop_rates": RATES, "n_test": len(test),
        "n_partial_only": int(variants["partial_only"][1].sum()),
        "oracle_auc": float(auc(test[spec.truth].to_numpy(float), y)),
        "train_s": {name: run.seconds for name, run in runs.items()}, "auc": {}, "calib_ratio": {},
    }
    for name, run in runs.items():
        result["auc"][name], result["calib_ratio"][name] = {}, {}
        for v, (frame, keep) in variants.items():
            p = np.asarray(run.model.predict(frame), dtype=float)
            result["auc"][name][v] = auc(p[keep], y[keep])
            result["calib_ratio"][name][v] = calibration_ratio(p[keep], y[keep])
        print(f"seed {seed}, trained on {name}:", result["auc"][name], flush=True)
    result["dropped_minus_full"] = {v: result["auc"]["dropped"][v] - result["auc"]["full"][v] for v in result["auc"]["full"]}
    return result


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' runs as measured, plus the mean AUC per (trained on, tested on) cell."""
    models, variants = list(results[0]["auc"]), list(results[0]["auc"]["full"])
    mean = {m: {v: float(np.mean([r["auc"][m][v] for r in results])) for v in variants} for m in models}
    return {"rows": results[0]["rows"], "seeds": [r["seed"] for r in results], "drop_rates": RATES, "mean_auc": mean,
            "dropped_minus_full_mean": {v: mean["dropped"][v] - mean["full"][v] for v in variants},
            "by_seed": {str(r["seed"]): r for r in results}}


def markdown(result: dict[str, Any]) -> str:
    variants = list(result["mean_auc"]["full"])
    lines = [
        (f"Simulator, {result['rows']:,} rows (time split: test = last 20%), seeds {result['seeds']} (the seed builds "
        "the world, draws the rows and inits the model); `dropped` trained with 30% of texts and 30% of images "
        "removed at random."),
        "",
        "| trained on | seed | " + " | ".join(f"test: {n}" for n in variants) + " |",
        "| --- | --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    for model in result["mean_auc"]:
        for seed, r in result["by_seed"].items():
            lines.append(f"| {model} | {seed} | " + " | ".join(f"{r['auc'][model][v]:.4f}" for v in variants) + " |")
        lines.append(f"| **{model}** | mean | " + " | ".join(f"**{result['mean_auc'][model][v]:.4f}**" for v in variants)
                     + " |")
    lines += ["", ("Test AUC. `partial_mix`: the test rows with the same random 30% / 30% drop; `partial_only`: "
              "its rows that lost text or image (about half); `no_text` / `no_image` / `tabular_only`: every row "
              "without text / image / both.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    ap.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the trainer config's)")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.table:
        result = read_json(NAME, args.results_dir)
        if result is None:
            raise SystemExit(f"--table: no {NAME}.json in {args.results_dir}; run the benchmark first")
    else:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                runs.append(one_seed(args.rows, seed, args.epochs, Path(tmp)))
                result = {**combine(runs), "machine": machine()}
                write_json(NAME, result, args.results_dir)  # after every seed: a cut-short run keeps them
    write_markdown(NAME, markdown(result), args.results_dir)
    print(markdown(result))


if __name__ == "__main__":
    main()
