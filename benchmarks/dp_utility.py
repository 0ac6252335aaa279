"""DP-SGD privacy-utility trade-off of AdPredictorNN on the default simulator.

Writes benchmarks/results/dp_utility.{json,md} and dp_privacy_utility.png: test AUC at epsilon in
{1, 3, 8, inf} on the default simulator (conf/data/synthetic.yaml, 800k rows). Every point is a real
`train.py` run (a subprocess, the full pipeline: `privacy=dp privacy.target_epsilon=E` with
privacy=dp's own defaults, or `privacy=none` for inf) in outputs/benchmarks/dp_utility/eps_<E>/.
Runs are resumable per epsilon: a finished run (report/metrics.json and the same overrides) is read
back, not retrained; a killed one resumes from its last.ckpt (`ckpt_path=auto`, which restores the
accountant); a run with other overrides is deleted and run again. For each DP run the reported
epsilon is recomputed from report/privacy.json's (noise, q, steps) history with fresh Opacus PRV and
RDP accountants, and the audit's empirical lower bound is recorded next to it.

    python -m benchmarks.dp_utility                    # 4 full runs (long), resumable per epsilon
    python -m benchmarks.dp_utility --table            # re-draw dp_utility.md / .png from the JSON
    python -m benchmarks.dp_utility --epsilons inf,8 --override data.source.n=6000 \
        --override trainer.max_epochs=1 --runs-dir /tmp/dp/runs --results-dir /tmp/dp   # a trial run
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, RUNS, machine, parser, read_json, repo_path, write_json, write_markdown

NAME = "dp_utility"


def _eps_name(eps: float) -> str:
    return "inf" if not np.isfinite(eps) else f"{eps:g}"


def run_overrides(eps: float, extra: list[str]) -> list[str]:
    """train.py overrides of one point (part of the run's signature: changing them reruns it)."""
    privacy = ["privacy=none"] if not np.isfinite(eps) else ["privacy=dp", f"privacy.target_epsilon={eps:g}"]
    return [*privacy, "extras.print_config=false", "callbacks.rich_progress_bar=null", *extra]


def recompute_epsilon(privacy: dict) -> dict:
    """Epsilon of the report's (noise, q, steps) history at its delta, with fresh Opacus accountants."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    out = {}
    for name, cls in (("prv", PRVAccountant), ("rdp", RDPAccountant)):
        acc = cls()
        acc.history = [(float(s), float(q), int(n)) for s, q, n in privacy["history"]]
        out[name] = float(acc.get_epsilon(delta=float(privacy["delta"])))
    return out


def utility_row(eps: float, run_dir: Path, overrides: list[str], seconds: float | None) -> dict:
    """One table row: the run's test metrics, its DP settings and epsilon (reported and recomputed), the audit."""
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    row = {"target_epsilon": eps, "run_dir": repo_path(run_dir), "overrides": overrides,
           "test_auc": metrics.get("test/auc"), "test_logloss": metrics.get("test/logloss"),
           "oracle_auc": metrics.get("test/oracle_auc"), "val_auc": metrics.get("val/auc"), "seconds": seconds}
    cfg = _run_config(run_dir)
    row["dp_defaults"] = _dp_defaults_hash() if np.isfinite(eps) else None
    row["batch_size"] = cfg.get("data", {}).get("batch_size")
    row["lr"] = (cfg.get("privacy") or {}).get("lr") or cfg.get("model", {}).get("optimizer", {}).get("lr")
    row["max_epochs"] = cfg.get("trainer", {}).get("max_epochs")
    if np.isfinite(eps):
        p = json.loads((run_dir / "report" / "privacy.json").read_text())
        again = recompute_epsilon(p)
        row.update({
            "epsilon": p["epsilon"], "accountant": p["accountant"], "delta": p["delta"],
            "noise_multiplier": p["noise_multiplier"], "sample_rate": p["sample_rate"], "steps": p["steps"],
            "max_grad_norm": p["max_grad_norm"], "expected_batch_size": p["expected_batch_size"],
            "n_train": p.get("n_train"), "stopped_for_budget": p.get("stopped_for_budget"),
            "epsilon_recomputed_prv": again["prv"], "epsilon_recomputed_rdp": again["rdp"],
            "epsilon_reported_prv": p["epsilon_prv"], "epsilon_reported_rdp": p["epsilon_rdp"],
            "recomputed_matches": bool(np.isclose(again["prv"], p["epsilon_prv"], rtol=1e-9)
                                       and np.isclose(again["rdp"], p["epsilon_rdp"], rtol=1e-9)),
            "within_target": bool(p["epsilon"] <= eps),
            "audit_epsilon_lower_bound": p.get("audit/epsilon_lower_bound"),
            "audit_canaries": p.get("audit/canaries"), "audit_canary_auc": p.get("audit/canary_auc"),
            "audit_mia_auc": p.get("audit/mia_auc"), "audit_mia_auc_low": p.get("audit/mia_auc_low"),
            "audit_mia_auc_high": p.get("audit/mia_auc_high"),
            "audit_lower_bound_le_epsilon": (None if p.get("audit/epsilon_lower_bound") is None
                                             else bool(p["audit/epsilon_lower_bound"] <= p["epsilon"])),
            "grad_sample_mode": p.get("grad_sample_mode"),
        })
    else:
        row["epsilon"] = float("inf")
    return row


def _run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def privacy_utility(epsilons: list[float], extra: list[str], runs_dir: Path, results_dir: Path) -> list[dict]:
    """One full train.py run per epsilon in runs_dir/eps_<E> (resumable); returns the table rows, inf first."""
    prior = {r["target_epsilon"]: r for r in _load_rows(results_dir)}
    rows = []
    for eps in epsilons:
        run_dir = runs_dir / f"eps_{_eps_name(eps)}"
        overrides = run_overrides(eps, extra)
        done = (run_dir / "report" / "metrics.json").is_file()
        meta = run_dir / "benchmark_overrides.json"
        # a DP run is also keyed by privacy=dp's defaults file: changing a DP default reruns it
        signature = overrides + ([_dp_defaults_hash()] if np.isfinite(eps) else [])
        same = meta.is_file() and json.loads(meta.read_text()) == signature
        if not (done and same):
            if run_dir.exists() and not same:
                shutil.rmtree(run_dir)  # another setting: start over
            run_dir.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(signature))
            cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "ckpt_path=auto",
                   f"paths.output_dir={run_dir}", f"hydra.run.dir={run_dir}"]
            print("running:", " ".join(cmd), flush=True)
            t = time.perf_counter()
            with open(run_dir / "benchmark.log", "a") as logf:
                subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, check=True)
            seconds = time.perf_counter() - t
        else:
            seconds = (prior.get(eps) or {}).get("seconds")
            print(f"eps={_eps_name(eps)}: reusing {run_dir}", flush=True)
        rows.append(utility_row(eps, run_dir, overrides, seconds))
        print({k: rows[-1].get(k) for k in ("target_epsilon", "epsilon", "test_auc", "steps")}, flush=True)
        _save_rows(_merge(prior, rows), results_dir)  # after every run: a killed sweep keeps what it has
    return _merge(prior, rows)


def _dp_defaults_hash() -> str:
    return "conf/privacy/dp.yaml sha256:" + hashlib.sha256((ROOT / "conf" / "privacy" / "dp.yaml").read_bytes()).hexdigest()


def _merge(prior: dict, rows: list[dict]) -> list[dict]:
    by_eps = {**prior, **{r["target_epsilon"]: r for r in rows}}
    return [by_eps[e] for e in sorted(by_eps, key=lambda e: -e)]  # inf, 8, 3, 1


def _load_rows(results_dir: Path) -> list[dict]:
    stored = read_json(NAME, results_dir)
    if stored is None:
        return []
    rows = stored["rows"]
    for r in rows:
        r["target_epsilon"], r["epsilon"] = float(r["target_epsilon"]), float(r["epsilon"])
    return rows


def _save_rows(rows: list[dict], results_dir: Path) -> None:
    base = next((r for r in rows if not np.isfinite(r["target_epsilon"])), None)
    summary = {}
    if base is not None:
        for r in rows:
            if np.isfinite(r["target_epsilon"]) and r.get("test_auc") is not None:
                summary[f"auc_gap_eps_{_eps_name(r['target_epsilon'])}"] = base["test_auc"] - r["test_auc"]
        gap8 = summary.get("auc_gap_eps_8")
        summary["eps8_within_0.02_of_non_dp"] = None if gap8 is None else bool(gap8 <= 0.02)
    dp = [r for r in rows if np.isfinite(r["target_epsilon"])]
    summary["all_reported_epsilon_within_target"] = all(r.get("within_target") for r in dp) if dp else None
    summary["all_recomputed_match"] = all(r.get("recomputed_matches") for r in dp) if dp else None
    summary["all_audit_lower_bounds_le_epsilon"] = (all(r.get("audit_lower_bound_le_epsilon") for r in dp)
                                                    if dp else None)
    # strict JSON: the non-DP row's epsilon is the string "inf" (float("inf") reads it back)
    strict = [{**r, **{k: "inf" for k in ("target_epsilon", "epsilon") if not np.isfinite(float(r[k]))}}
              for r in rows]
    out = {"data": "conf/data/synthetic.yaml (default simulator, 800k rows unless a row's overrides say otherwise)",
           "machine": machine(), "rows": strict, "summary": summary}
    write_json(NAME, out, results_dir)


def markdown(rows: list[dict], summary: dict) -> str:
    """The privacy-utility table, generated from dp_utility.json."""
    base = next((r for r in rows if not np.isfinite(r["target_epsilon"])), None)
    lines = [
        ("| target ε | reported ε (PRV) | recomputed ε PRV / RDP | test AUC | Δ AUC vs non-DP | noise σ | batch (E) "
         "| q | steps | audit ε lower bound | MIA AUC [95% CI] |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eps = r["target_epsilon"]
        auc = r.get("test_auc")
        gap = "" if base is None or auc is None or r is base else f"{auc - base['test_auc']:+.4f}"
        if not np.isfinite(eps):
            lines.append(f"| ∞ (non-DP) | - | - | {auc:.4f} | - | - | {r.get('batch_size')} | - | - | - | - |")
            continue
        mia = r.get("audit_mia_auc")
        mia_s = "-" if mia is None else f"{mia:.3f} [{r['audit_mia_auc_low']:.3f}, {r['audit_mia_auc_high']:.3f}]"
        lb = r.get("audit_epsilon_lower_bound")
        lines.append(
            f"| {eps:g} | {r['epsilon']:.3f} | {r['epsilon_recomputed_prv']:.3f} / {r['epsilon_recomputed_rdp']:.3f} "
            f"| {auc:.4f} | {gap} | {r['noise_multiplier']:.3f} | {r['expected_batch_size']:g} "
            f"| {r['sample_rate']:.4g} | {r['steps']} | {'-' if lb is None else f'{lb:.3f}'} | {mia_s} |"
        )
    oracle = next((r.get("oracle_auc") for r in rows if r.get("oracle_auc")), None)
    notes = [""]
    shown = ("privacy", "extras.", "callbacks.rich_progress_bar")
    common = [o for o in (rows[0].get("overrides") or []) if not o.startswith(shown)
              and all(o in (r.get("overrides") or []) for r in rows)] if rows else []
    notes.append("Every row is a full `python train.py` run (`privacy=dp privacy.target_epsilon=E` with privacy=dp's "
                 "defaults, or `privacy=none`)" + (f" with `{' '.join(common)}`" if common else "")
                 + "; test AUC of the calibrated model on the time-ordered test split.")
    if oracle:
        notes.append(f"Oracle AUC (the simulator's true CTR) on the same test split: {oracle:.4f}.")
    gap8 = summary.get("auc_gap_eps_8")
    if gap8 is not None:
        notes.append(f"Acceptance (ε = 8 within 0.02 AUC of non-DP): gap {gap8:.4f} -> "
                     f"{'met' if summary.get('eps8_within_0.02_of_non_dp') else 'NOT met'}.")
    notes.append("Recomputed ε: fresh `opacus.accountants.PRVAccountant` / `RDPAccountant` on report/privacy.json's "
                 "(noise, q, steps) history at its δ. δ = 1/(10 N_train). Audit: one-run canary bound "
                 "(Steinke et al. 2023, 1000 canaries, β = 0.05) and loss-threshold MIA AUC.")
    return "\n".join(lines + notes) + "\n"


def write_table_and_plot(results_dir: Path) -> None:
    """dp_utility.md and dp_privacy_utility.png, from dp_utility.json."""
    data = read_json(NAME, results_dir)
    if data is None:
        raise SystemExit(f"--table: no {NAME}.json in {results_dir}; run the sweep first")
    rows = _load_rows(results_dir)
    table = markdown(rows, data["summary"])
    write_markdown(NAME, table, results_dir)
    plot(rows, results_dir / "dp_privacy_utility.png")
    print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["target_epsilon"])  # 1, 3, 8, inf
    labels = ["∞ (non-DP)" if not np.isfinite(r["target_epsilon"]) else f"{r['target_epsilon']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(range(len(rows)), [r["test_auc"] for r in rows], "o-", label="test AUC")
    base = next((r for r in rows if not np.isfinite(r["target_epsilon"])), None)
    if base is not None:
        ax.axhspan(base["test_auc"] - 0.02, base["test_auc"], color="tab:green", alpha=0.12,
                   label="within 0.02 of non-DP")
    oracle = next((r.get("oracle_auc") for r in rows if r.get("oracle_auc")), None)
    if oracle:
        ax.axhline(oracle, ls="--", c="gray", label="oracle AUC (true CTR)")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("target ε (δ = 1/(10 N))")
    ax.set_ylabel("test AUC")
    ax.set_title("DP-SGD privacy-utility (AdPredictorNN, default simulator)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--table", action="store_true", help="only regenerate dp_utility.md and the plot from the JSON")
    ap.add_argument("--epsilons", default="inf,8,3,1", help="comma list; inf = the non-DP run")
    ap.add_argument("--override", action="append", default=[],
                    help="extra train.py override for every run (e.g. data.source.n=100000 for a smoke run)")
    ap.add_argument("--runs-dir", type=Path, default=RUNS / NAME, help="where the train.py runs go (resumable)")
    args = ap.parse_args()
    if not args.table:
        epsilons = [float(e) for e in args.epsilons.split(",")]
        privacy_utility(epsilons, list(args.override), args.runs_dir, args.results_dir)
    write_table_and_plot(args.results_dir)


if __name__ == "__main__":
    main()
