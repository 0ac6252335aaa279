"""Hierarchical account effects, ablated on the simulator: AdPredictorNN with and without
`model.net.hierarchy=[account_id, campaign_id]` (nested random-effect offsets on the logit;
within/nn/hierarchy.py). Three arms: `off`; `hierarchy`, the prior sd tau set by empirical Bayes;
`hierarchy_true_tau`, tau fixed at the world's true account and campaign sds (what a perfect
estimate of tau would give).

Each arm is a full `run_train` (benchmarks.common.train) with temperature calibration and no other
post-fit step, on a reduced simulator (`--n` rows, `--epochs` epochs) for each seed in `--seeds`; the
seed moves the world, the rows and the model init together, and both arms of a seed see the same rows.
Two worlds:

- `default`: the embedded default's hierarchy (40 accounts x 5 campaigns, account sd 0.35, campaign sd
  0.12 around its account);
- `many_campaigns`: 100 accounts x 10 campaigns, account sd 0.5, campaign sd 0.35: many campaigns with
  few rows each, where pooling toward the account should matter most.

On the test split (the latest rows, never trained on), per run: AUC, log loss, and calibration by
account and by campaign:
- Field-RCE (Pan et al., WWW 2020; within.calibration.metrics.field_rce): impression-weighted
  |sum(y - p)| / sum(y) per value, values with under 10 clicks pooled into one (as binary_report does);
- mean |RCE|: the plain mean over values of |sum(p) - sum(y)| / sum(y) (values with >= 1 click).
For the hierarchy arm also the learned prior sds (tau) and the correlation of the learned campaign
deviations with the simulator's true campaign effects (`AdMarketSimulator.campaign_effect`).
Differences are paired by seed.

    python -m benchmarks.account_effects                                  # both worlds, 3 seeds
    python -m benchmarks.account_effects --worlds default --seeds 7 --n 20000 --epochs 1 --results-dir /tmp/ae
    python -m benchmarks.account_effects --table                          # the markdown from the JSON
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, parser, read_json, train, write_json, write_markdown

NAME = "account_effects"
HIERARCHY = "model.net.hierarchy=[account_id,campaign_id]"
ARMS = ("off", "hierarchy", "hierarchy_true_tau")
WORLDS: dict[str, dict[str, Any]] = {
    "default": {},
    "many_campaigns": {"n_accounts": 100, "campaigns_per_account": 10, "account_sd": 0.5, "campaign_sd": 0.35},
}
DEFAULT_SD = {"account_sd": 0.35, "campaign_sd": 0.12}  # the simulator's (conf/data/synthetic.yaml)


def arm_overrides(arm: str, world: str) -> list[str]:
    """off: no hierarchy; hierarchy: tau by empirical Bayes; hierarchy_true_tau: tau fixed at the world's true sds."""
    if arm == "off":
        return []
    if arm == "hierarchy":
        return [HIERARCHY]
    sd = {**DEFAULT_SD, **WORLDS[world]}
    return [HIERARCHY, f"model.net.hierarchy_tau=[{sd['account_sd']},{sd['campaign_sd']}]"]
METRICS = ("test/auc", "test/logloss", "field_rce/account_id", "field_rce/campaign_id",
           "mean_abs_rce/account_id", "mean_abs_rce/campaign_id")


def mean_abs_rce(p: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Mean over values with at least one click of |sum(p) - sum(y)| / sum(y)."""
    _, idx = np.unique(groups, return_inverse=True)
    sp, sy = np.bincount(idx, p), np.bincount(idx, y)
    keep = sy > 0
    return float(np.mean(np.abs(sp[keep] - sy[keep]) / sy[keep]))


def evaluate(run: Any, world: dict[str, Any], seed: int) -> dict[str, float]:
    from within.calibration.metrics import auc, field_rce, logloss
    from within.data.simulator import AdMarketSimulator

    test = run.frames()["test"]
    y = test["clicked"].to_numpy(np.float64)
    p = np.asarray(run.model.predict(test), dtype=np.float64)
    out = {"test/auc": auc(p, y), "test/logloss": logloss(p, y)}
    for field in ("account_id", "campaign_id"):
        g = test[field].astype(str).to_numpy()
        out[f"field_rce/{field}"] = field_rce(p, y, g, min_clicks=10)
        out[f"mean_abs_rce/{field}"] = mean_abs_rce(p, y, g)
    layer = getattr(run.model.net, "hierarchy", None)
    if layer is not None:
        sim = AdMarketSimulator(seed=seed, **world)
        out.update({f"tau/{f}": t for f, t in zip(layer.fields, layer.tau)})
        vocab = run.model.processor.vocabs["campaign_id"]
        learned = layer.effect_table()[layer.fields.index("campaign_id")][2:].double().numpy()
        truth = dict(zip(map(str, sim.campaign_ids), sim.campaign_effect))
        out["campaign_effect_corr"] = float(np.corrcoef(learned, [truth[v] for v in vocab])[0, 1])
    return out


def run_one(world: str, arm: str, seed: int, n: int, epochs: int, batch_size: int, hidden: str) -> dict[str, Any]:
    source = [f"data.source.{k}={v}" for k, v in WORLDS[world].items()]
    with tempfile.TemporaryDirectory() as tmp:
        run = train([f"seed={seed}", f"data.source.n={n}", f"trainer.max_epochs={epochs}",
                     f"data.batch_size={batch_size}", f"model.net.hidden_dims={hidden}", "trainer=cpu",
                     "postfit=[calibrate]", *source, *arm_overrides(arm, world)], Path(tmp))
        return {"world": world, "arm": arm, "seed": seed, **evaluate(run, WORLDS[world], seed),
                "seconds": round(run.seconds, 1)}


def _stat(v: list[float]) -> dict[str, float | None]:
    a = np.asarray(v, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for world in WORLDS:
        rows = [r for r in runs if r["world"] == world]
        if not rows:
            continue
        summ: dict[str, Any] = {}
        for arm in ARMS:
            mine = [r for r in rows if r["arm"] == arm]
            if mine:
                keys = [k for k in mine[0] if k not in ("world", "arm", "seed")]
                summ[arm] = {"seeds": [r["seed"] for r in mine], **{k: _stat([r[k] for r in mine]) for k in keys}}
        base = {r["seed"]: r for r in rows if r["arm"] == "off"}
        for arm in ARMS[1:]:
            paired = [(r, base[r["seed"]]) for r in rows if r["arm"] == arm and r["seed"] in base]
            if paired:
                summ[f"{arm} - off"] = {k: _stat([a[k] - b[k] for a, b in paired]) for k in METRICS}
                summ[f"{arm} - off"]["seeds"] = [a["seed"] for a, _ in paired]
        out[world] = summ
    return out


def _fmt(s: dict[str, Any] | None, digits: int = 4) -> str:
    if not s:
        return "-"
    sd = "" if s.get("sd") is None else f" ± {s['sd']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{sd}"


def table(result: dict[str, Any]) -> str:
    lines = [f"Setup: {result['setup']}", ""]
    for world, summ in result["summary"].items():
        lines += [f"### world `{world}` ({WORLDS[world] or 'the embedded default'})", "",
                  ("| arm | seeds | test AUC | test log loss | Field-RCE account | Field-RCE campaign "
                  "| mean abs RCE account | mean abs RCE campaign |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for arm in (*ARMS, *(f"{a} - off" for a in ARMS[1:])):
            s = summ.get(arm)
            if s is None:
                continue
            label = f"{arm} (paired by seed)" if arm.endswith(" - off") else arm
            lines.append(f"| {label} | {len(s['seeds'])} | " + " | ".join(_fmt(s.get(k)) for k in METRICS) + " |")
        for arm in ARMS[1:]:
            h = summ.get(arm)
            if h:
                taus = ", ".join(f"{k.removeprefix('tau/')} {_fmt(v, 3)}" for k, v in h.items() if k.startswith("tau/"))
                lines += ["", (f"`{arm}`: tau {taus}; corr(learned campaign deviation, true campaign effect) "
                          f"{_fmt(h.get('campaign_effect_corr'), 3)}.")]
        lines.append("")
    lines.append("Mean ± sd over seeds; the difference row pairs the arms by seed.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[7, 8, 9])
    ap.add_argument("--n", type=int, default=30_000, help="simulator rows per run")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--hidden", default="[64]", help="model.net.hidden_dims (the default tower is [256,128])")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the saved JSON and stop")
    args = ap.parse_args()
    if args.table:
        saved = read_json(NAME, args.results_dir)
        if saved is None:
            raise SystemExit(f"no {NAME}.json in {args.results_dir}; run the benchmark first")
        print(table(saved))
        return
    from rich.progress import Progress

    setup = {"n": args.n, "epochs": args.epochs, "batch_size": args.batch_size, "hidden_dims": args.hidden,
             "hierarchy_lr_scale": 10.0, "postfit": "calibrate (temperature)", "split": "time: train 60% | val 10% | calib 10% | test 20%"}
    saved = read_json(NAME, args.results_dir) or {}
    same = saved.get("setup") == setup
    runs = [r for r in saved.get("runs", []) if same]  # resume a cut-short run of the same setup
    done = {(r["world"], r["arm"], r["seed"]) for r in runs}
    todo = [(w, a, s) for w in args.worlds for s in args.seeds for a in ARMS if (w, a, s) not in done]
    with Progress() as progress:
        task = progress.add_task("account effects", total=len(todo))
        for world, arm, seed in todo:
            progress.update(task, description=f"{world} / {arm} / seed {seed}")
            runs.append(run_one(world, arm, seed, args.n, args.epochs, args.batch_size, args.hidden))
            result = {"setup": setup, "machine": machine(), "runs": runs, "summary": summarise(runs)}
            write_json(NAME, result, args.results_dir)  # after every run: a cut-short run keeps what finished
            progress.advance(task)
    result = {"setup": setup, "machine": machine(), "runs": runs, "summary": summarise(runs)}
    write_json(NAME, result, args.results_dir)
    write_markdown(NAME, table(result), args.results_dir)
    print(table(result))


if __name__ == "__main__":
    main()
