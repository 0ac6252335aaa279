"""Training-dynamics ablation: does QuantumNoiseLayer noise, its annealing schedule, or
AdaptiveDropout change val/test quality of AdPredictorNN on the default simulator?

Each config is a full `run_train` (benchmarks.common.train) on the default simulator with a reduced
size (`--n` rows, `--epochs` epochs, so the whole grid fits a small CPU budget), for each seed in
`--seeds`. The seed moves the world, the rows and the model init together. Post-fit steps are
skipped; val metrics are the best-checkpoint epoch's (min val/logloss, read from the CSV logger),
test AUC is the raw model (no calibrator) on the test split.

Writes benchmarks/results/ablation_dynamics.json after every run, so a cut-short run still records
exactly what finished. `--table` prints the README table from the JSON.

    python -m benchmarks.ablation_dynamics                       # full grid, 3 seeds
    python -m benchmarks.ablation_dynamics --configs off phase_cosine --seeds 7
    python -m benchmarks.ablation_dynamics --table
    python -m benchmarks.ablation_dynamics --n 3000 --epochs 1 --seeds 7 8 --configs off adaptive_dropout \
        --results-dir /tmp/ablation                              # a trial run
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine, parser, read_json, train, write_json

NAME = "ablation_dynamics"
ADAPTIVE = "model.net.adaptive_dropout={p:0.1,momentum:0.9,window_size:5,adaptive_range:[0.0,0.5]}"
NOISE = ["model.net.enable_quantum_noise=true"]
CONFIGS: dict[str, list[str]] = {
    "off": ["model.net.enable_quantum_noise=false"],
    "gaussian_cosine": [*NOISE, "model.net.noise.noise_type=gaussian", "model.net.noise.annealing_schedule=cosine"],
    **{f"phase_{s}": [*NOISE, "model.net.noise.noise_type=phase", f"model.net.noise.annealing_schedule={s}"]
       for s in ("cosine", "constant", "linear", "exponential")},
    "adaptive_dropout": ["model.net.enable_quantum_noise=false", ADAPTIVE],
}
BASELINE = "off"


def best_val(run_dir: Path) -> dict[str, float]:
    """val/logloss and val/auc of the epoch with the lowest val/logloss (the checkpoint kept)."""
    import pandas as pd

    rows = pd.read_csv(run_dir / "csv" / "metrics.csv")
    val = rows.dropna(subset=["val/logloss"])
    best = val.loc[val["val/logloss"].idxmin()]
    return {"val/logloss": float(best["val/logloss"]), "val/auc": float(best["val/auc"]),
            "best_epoch": int(best["epoch"])}


def run_one(name: str, seed: int, n: int, epochs: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = train([f"seed={seed}", f"data.source.n={n}", f"trainer.max_epochs={epochs}", f"data.batch_size={batch_size}",
                     "trainer=cpu", "postfit=[]", "calibrator=none", "logger=csv", *CONFIGS[name]], Path(tmp))
        return {"config": name, "seed": seed, **best_val(run.out_dir), "test/auc": run.metrics["test/auc"],
                "test/logloss": run.metrics["test/logloss"], "seconds": round(run.seconds, 1)}


def summarise(runs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in CONFIGS:
        rows = [r for r in runs if r["config"] == name]
        if not rows:
            continue
        summ: dict = {"n_seeds": len(rows), "seeds": [r["seed"] for r in rows]}
        for key in ("val/logloss", "val/auc", "test/auc", "test/logloss"):
            v = np.array([r[key] for r in rows])
            summ[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None}
        out[name] = summ
    base = {r["seed"]: r for r in runs if r["config"] == BASELINE}
    for name, summ in out.items():
        if name == BASELINE:
            continue
        # paired by seed: each seed is its own world, so compare within a seed
        for key, better in (("val/logloss", -1), ("val/auc", 1), ("test/auc", 1)):
            d = np.array([r[key] - base[r["seed"]][key] for r in runs if r["config"] == name and r["seed"] in base])
            if len(d) < 2:
                continue
            sd = float(d.std(ddof=1))
            gain = better * d.mean() > 2 * sd / math.sqrt(len(d)) if sd > 0 else False
            loss = -better * d.mean() > 2 * sd / math.sqrt(len(d)) if sd > 0 else False
            summ.setdefault("vs_off", {})[key] = {"mean_diff": float(d.mean()), "sd_diff": sd,
                                                  "verdict": "gain" if gain else ("worse" if loss else "no clear difference")}
    return out


def table(result: dict) -> str:
    def fmt(s: dict, nd: int) -> str:
        return f"{s['mean']:.{nd}f} ± {s['sd']:.{nd}f}" if s["sd"] is not None else f"{s['mean']:.{nd}f}"

    lines = ["| config | seeds | val logloss | val AUC | test AUC | vs off (val logloss / val AUC / test AUC) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in result["summary"].items():
        vs = s.get("vs_off")
        verdicts = " / ".join(f"{vs[k]['mean_diff']:+.4f} ({vs[k]['verdict']})" for k in ("val/logloss", "val/auc", "test/auc")
                              if k in vs) if vs else "-"
        lines.append(f"| `{name}` | {s['n_seeds']} | {fmt(s['val/logloss'], 4)} | {fmt(s['val/auc'], 4)} | "
                     f"{fmt(s['test/auc'], 4)} | {verdicts} |")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=150_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--resume", action="store_true", help="keep finished runs of a JSON with the same settings")
    ap.add_argument("--table", action="store_true", help="print the README table from the JSON and exit")
    args = ap.parse_args()
    old = read_json(NAME, args.results_dir)
    if args.table:
        if old is None:
            raise SystemExit(f"--table: no {NAME}.json in {args.results_dir}; run the benchmark first")
        print(table(old))
        return
    import torch

    torch.set_num_threads(2)
    result = {
        "description": "AdPredictorNN on the default simulator, reduced size; val metrics at the best "
                       "(min val/logloss) epoch, test AUC of the raw model; vs_off compares with config "
                       "'off' paired by seed, 'gain' only when |mean diff| > 2 * sd_diff / sqrt(seeds)",
        "settings": {"data.source.n": args.n, "trainer.max_epochs": args.epochs,
                     "data.batch_size": args.batch_size, "seeds": args.seeds,
                     "configs": {k: CONFIGS[k] for k in args.configs}, "trainer": "cpu", "postfit": [],
                     "calibrator": "none"},
        "machine": machine(),
        "complete": False,
        "runs": [],
    }
    if args.resume and old is not None and old["settings"] == result["settings"]:
        result["runs"] = old["runs"]
    done = {(r["config"], r["seed"]) for r in result["runs"]}
    for seed in args.seeds:  # seed-major: a cut-short run still has paired configs per seed
        for name in args.configs:
            if (name, seed) in done:
                continue
            result["runs"].append(run_one(name, seed, args.n, args.epochs, args.batch_size))
            result["summary"] = summarise(result["runs"])
            write_json(NAME, result, args.results_dir)
            print(result["runs"][-1], flush=True)
    result["summary"], result["complete"] = summarise(result["runs"]), True
    print(f"wrote {write_json(NAME, result, args.results_dir)}")
    print(table(result))


if __name__ == "__main__":
    main()
