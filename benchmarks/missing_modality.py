"""Missing-modality ablation on the simulator: train with 30% of images and 30% of text dropped.

Two runs of the real training pipeline (model=nn, data=synthetic with ``--rows`` rows, same seed,
same split, post-fit ``calibrate``):

* ``full``: trained on complete records;
* ``dropped``: trained with ``data.drop_modality={text: 0.3, image: 0.3}``: on the train, val and
  calib splits each row independently loses its text (empty string) with probability 0.3 and its
  image (None) with probability 0.3, which the processor turns into ``mask_text`` / ``mask_image``
  False (the model's learned stand-in vector, masked out of CrossModalAttention).

Both models are scored on the same test rows (the last 20% in time), as served by
``AdScorePredictor.predict`` on DataFrames:

* ``full``: complete test records;
* ``partial_mix``: the test records with the same random 30% / 30% drop (AUC over all rows);
* ``partial_only``: only the test rows of ``partial_mix`` that lost at least one modality;
* ``no_text`` / ``no_image`` / ``tabular_only``: every test row without text / image / both.

    python benchmarks/missing_modality.py                # 200k rows -> results/missing_modality.{json,md}
    python benchmarks/missing_modality.py --rows 30000 --epochs 2 --out /tmp/mm.json   # a quick run
    python benchmarks/missing_modality.py --seed 8 --out /tmp/mm8.json    # another seed, then merge the runs:
    python benchmarks/missing_modality.py --combine /tmp/mm7.json /tmp/mm8.json   # -> results/missing_modality.{json,md}
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import ROOT, compose

RESULTS = ROOT / "benchmarks" / "results"
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


def train(rows: int, seed: int, epochs: int | None, drop: dict[str, float] | None, out: Path) -> tuple[Path, float]:
    from within.pipeline.train import run_train

    overrides = [
        "data=synthetic", f"data.source.n={rows}", f"seed={seed}", "postfit=[calibrate,export]", "export.onnx=false",
        "logger=none", "extras.print_config=false", "++trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "~callbacks.rich_progress_bar", "~callbacks.lr_monitor",
    ]
    if epochs:
        overrides.append(f"trainer.max_epochs={epochs}")
    if drop:
        overrides.append("+data.drop_modality={" + ",".join(f"{k}:{v}" for k, v in drop.items()) + "}")
    cfg = compose(overrides, out)
    t0 = time.perf_counter()
    run_train(cfg)
    return out / "bundle", time.perf_counter() - t0


def markdown(result: dict[str, Any]) -> str:
    names = list(next(iter(result["auc"].values())))
    lines = [
        (f"Simulator, {result['rows']:,} rows (time split: test = last 20%, {result['n_test']:,} rows), seed "
        f"{result['seed']}; `dropped` trained with 30% of texts and 30% of images removed at random."),
        "",
        "| trained on | " + " | ".join(f"test: {n}" for n in names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for model, aucs in result["auc"].items():
        lines.append(f"| {model} | " + " | ".join(f"{aucs[n]:.4f}" for n in names) + " |")
    lines += ["", (f"Test AUC; `partial_only` = the {result['n_partial_only']:,} test rows of `partial_mix` that lost "
              "text or image; `tabular_only` = no text and no image on any row.")]
    return "\n".join(lines) + "\n"


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One file for several single-seed runs (same rows): the runs as written, plus the mean AUC per cell."""
    rows = {r["rows"] for r in results}
    if len(rows) != 1:
        raise SystemExit(f"--combine: runs differ in --rows {sorted(rows)}")
    models, variants = list(results[0]["auc"]), list(results[0]["auc"]["full"])
    mean = {m: {v: float(np.mean([r["auc"][m][v] for r in results])) for v in variants} for m in models}
    return {"rows": rows.pop(), "seeds": [r["seed"] for r in results], "drop_rates": RATES, "mean_auc": mean,
            "dropped_minus_full_mean": {v: mean["dropped"][v] - mean["full"][v] for v in variants},
            "by_seed": {str(r["seed"]): r for r in results}}


def markdown_combined(result: dict[str, Any]) -> str:
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the trainer config's)")
    ap.add_argument("--out", default=str(RESULTS / "missing_modality.json"))
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON")
    ap.add_argument("--combine", nargs="+", default=None,
                    help="single-seed JSONs written by this script -> one --out with per-seed rows and means")
    args = ap.parse_args()
    out = Path(args.out)
    if args.combine or (args.table and "by_seed" in json.loads(out.read_text())):
        result = combine([json.loads(Path(p).read_text()) for p in args.combine]) if args.combine else \
            json.loads(out.read_text())
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown_combined(result))
        print(markdown_combined(result))
        return
    if args.table:
        result = json.loads(out.read_text())
    else:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        import torch

        from within.calibration.metrics import auc, calibration_ratio
        from within.models.predictor import AdScorePredictor
        from within.pipeline.train import build_datamodule

        result: dict[str, Any] = {
            "rows": args.rows, "seed": args.seed, "epochs": args.epochs, "drop_rates": RATES,
            "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "device": "cpu", "auc": {}, "calib_ratio": {}, "train_s": {},
        }
        with tempfile.TemporaryDirectory() as tmp:
            bundles = {}
            for name, drop in (("full", None), ("dropped", RATES)):
                bundles[name], result["train_s"][name] = train(args.rows, args.seed, args.epochs, drop,
                                                               Path(tmp) / name)
                print(f"trained {name} in {result['train_s'][name]:.0f}s", flush=True)
            cfg = compose(["data=synthetic", f"data.source.n={args.rows}", f"seed={args.seed}"])
            dm = build_datamodule(cfg)
            dm.setup("fit")
            test, spec = dm.frames["test"], dm.spec
            variants = test_variants(test, spec, args.seed)
            y = test[spec.label].to_numpy(dtype=float)
            result["n_test"] = len(test)
            result["n_partial_only"] = int(variants["partial_only"][1].sum())
            result["oracle_auc"] = float(auc(test[spec.truth].to_numpy(float), y))
            for name, path in bundles.items():
                pred = AdScorePredictor.load(path)
                result["auc"][name], result["calib_ratio"][name] = {}, {}
                for v, (frame, rows) in variants.items():
                    p = np.asarray(pred.predict(frame), dtype=float)
                    result["auc"][name][v] = auc(p[rows], y[rows])
                    result["calib_ratio"][name][v] = calibration_ratio(p[rows], y[rows])
                print(name, json.dumps(result["auc"][name]), flush=True)
        result["dropped_minus_full"] = {v: result["auc"]["dropped"][v] - result["auc"]["full"][v]
                                        for v in result["auc"]["full"]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
