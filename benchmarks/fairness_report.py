"""Fairness reports and what per-group calibration does, over seeds, on the simulator and on KAG.

Each run is `python train.py data=<name> seed=<s> postfit=[calibrate,fairness,export]` (through
`run_train`): the `fairness` post-fit step writes report/fairness.json with the test split's
per-group metrics before and after per-demographic-group calibration (fitted on calib; on KAG,
which has no calib split, on val). Collected per run: the worst group's ECE (max over all groups
of every demographic field) before and after, the same group's ECE after, the worst group's ECE
against the true CTR on the simulator (less noisy than against 0/1 clicks), the ECE the true CTR
itself scores against the clicks in those groups (the label-noise floor no model gets under), and
the parity and equalized-odds differences. Reported as mean +- sd over seeds (sd with ddof=1); one full
fairness.json per dataset is kept as benchmarks/results/fairness_<dataset>.json.

    python -m benchmarks.fairness_report                       # simulator 3 seeds (200k rows, 3 epochs), KAG 5 seeds
    python -m benchmarks.fairness_report --datasets kag_conversion --kag-seeds 0 1

Resumable: runs already in the JSON are skipped (`--force` reruns them).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DATA_DIR, RESULTS, compose, machine, write_json

NAME = "fairness"


def run_once(data: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    from within.pipeline.train import run_train

    with tempfile.TemporaryDirectory(prefix=f"fairness_{data}_{seed}_") as tmp:
        out = Path(tmp)
        cfg = compose([f"data={data}", f"seed={seed}", "postfit=[calibrate,fairness,export]", "export.onnx=false",
                       "extras.print_config=false", *overrides], out_dir=out)
        run_train(cfg)
        report = json.loads((out / "report" / "fairness.json").read_text())
        metrics = json.loads((out / "report" / "metrics.json").read_text())
    before, after = report["before"], report["after"]
    worst = report["worst_group_ece"]
    out_row: dict[str, Any] = {
        "worst_group_ece_before": worst["before"]["ece"], "worst_group_ece_after": worst["after"]["ece"],
        "worst_group": f"{worst['before']['field']}={worst['before']['group']}",
        "same_group_ece_after": after["fields"][worst["before"]["field"]]["groups"][worst["before"]["group"]]["ece"],
        "test_auc": metrics.get("test/auc"), "calibration_split": report["calibration_split"],
    }
    if "ece_true" in before["overall"]:
        for when, rep in (("before", before), ("after", after)):
            out_row[f"worst_group_ece_true_{when}"] = max(
                m["ece_true"] for f in rep["fields"].values() for m in f["groups"].values())
        # label noise: the ECE the true CTR scores in the worst group, and at most over all groups
        out_row["worst_group_ece_of_true_ctr"] = (
            before["fields"][worst["before"]["field"]]["groups"][worst["before"]["group"]]["ece_of_true_ctr"])
        out_row["max_group_ece_of_true_ctr"] = max(
            m["ece_of_true_ctr"] for f in before["fields"].values() for m in f["groups"].values())
    for field, data_f in before["fields"].items():
        out_row[f"{field}/demographic_parity_difference"] = data_f["demographic_parity_difference"]
        out_row[f"{field}/equalized_odds_difference"] = data_f["equalized_odds_difference"]
        out_row[f"{field}/calibration_ratio_spread_before"] = data_f["difference"]["calibration_ratio"]
        out_row[f"{field}/calibration_ratio_spread_after"] = after["fields"][field]["difference"]["calibration_ratio"]
    return {"summary": out_row, "report": report}


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in next(iter(runs.values())).items() if isinstance(v, (int, float)) and v is not None]
    out: dict[str, Any] = {}
    for k in keys:
        v = np.asarray([r[k] for r in runs.values() if r.get(k) is not None], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": len(v)}
    lowered = [r["worst_group_ece_after"] < r["worst_group_ece_before"] for r in runs.values()]
    out["worst_group_ece_lowered_in"] = f"{sum(lowered)}/{len(lowered)} runs"
    return out


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, fmt)  # NaN is stored as null


def markdown(result: dict[str, Any]) -> str:
    lines = ["# fairness: per-group metrics and per-group calibration, over seeds", "",
             ("Worst group = the largest ECE over every group of every demographic field, on the test split. "
              "Per-group calibration is fitted on the calib split (KAG: val). mean +- sd over seeds. "
              "Shared 2-core machine."), ""]
    for data, entry in result["datasets"].items():
        s = entry["summary"]
        lines += [f"## {data} ({entry['config']})", "", "| statistic | mean | sd |", "| --- | --- | --- |"]
        for k, v in s.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {_num(v['mean'], '.4g')} | {_num(v['sd'], '.3g')} |")
        lines += ["", f"Worst-group ECE lowered in {s['worst_group_ece_lowered_in']}; worst groups: "
                  + ", ".join(sorted({r['worst_group'] for r in entry['runs'].values()})), ""]
    return "\n".join(lines)


DATASETS = {
    "synthetic": {"overrides": lambda a: [f"data.source.n={a.rows}", f"trainer.max_epochs={a.epochs}"],
                  "seeds": lambda a: a.sim_seeds},
    "kag_conversion": {"overrides": lambda a: [], "seeds": lambda a: a.kag_seeds},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--sim-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kag-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    path = RESULTS / f"{NAME}.json"
    result = json.loads(path.read_text()) if path.exists() and not args.force else {"datasets": {}}
    result["machine"] = machine()
    for data in args.datasets:
        if data == "kag_conversion" and not (DATA_DIR / "facebook_ad_conversions_KAG").is_dir():
            print(f"skipping {data}: {DATA_DIR / 'facebook_ad_conversions_KAG'} is absent", flush=True)
            continue
        overrides = DATASETS[data]["overrides"](args)
        entry = result["datasets"].setdefault(data, {"runs": {}})
        entry["config"] = " ".join(overrides) or "the data config's defaults"
        for seed in DATASETS[data]["seeds"](args):
            if str(seed) in entry["runs"]:
                continue
            run = run_once(data, seed, overrides)
            entry["runs"][str(seed)] = run["summary"]
            if not (RESULTS / f"{NAME}_{data}.json").exists() or args.force:  # one full report per dataset
                write_json(f"{NAME}_{data}", {"seed": seed, **run["report"]})
            entry["summary"] = summarise(entry["runs"])
            write_json(NAME, result)  # after every run: nothing lost on a crash
            (RESULTS / f"{NAME}.md").write_text(markdown(result))
            print(f"{data} seed {seed}: worst-group ECE {run['summary']['worst_group_ece_before']:.4f} -> "
                  f"{run['summary']['worst_group_ece_after']:.4f}", flush=True)


if __name__ == "__main__":
    main()
