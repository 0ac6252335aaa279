"""DP-SGD overhead and privacy-utility trade-off for AdPredictorNN.

    python benchmarks/dp_overhead.py --skip-utility        # step time / memory only (minutes)
    python benchmarks/dp_overhead.py --skip-overhead       # privacy-utility runs only (long: 4 full runs)
    python benchmarks/dp_overhead.py --table               # re-draw dp_utility.md / .png from the JSON

Overhead -> benchmarks/results/dp_overhead.json: step time (forward + backward + optimizer step)
and peak memory, non-DP vs DP, at batch 256 and 1024, for each grad_sample_mode (ghost | hooks |
functorch). CPU peak memory is the process's max RSS growth during the timed steps (psutil), GPU
peak is torch.cuda's.

Privacy-utility -> benchmarks/results/dp_utility.{json,md} and dp_privacy_utility.png: test AUC at
epsilon in {1, 3, 8, inf} on the default simulator (conf/data/synthetic.yaml, 800k rows). Every
point is a real `train.py` run (a subprocess, the full pipeline: `privacy=dp
privacy.target_epsilon=E` with privacy=dp's own defaults, or `privacy=none` for inf) in
outputs/dp_utility/eps_<E>/. Runs are resumable per epsilon: a finished run (report/metrics.json
and the same overrides) is read back, not retrained; a killed one resumes from its last.ckpt
(`ckpt_path=auto`, which restores the accountant). For each DP run the reported epsilon is
recomputed from report/privacy.json's (noise, q, steps) history with fresh Opacus PRV and RDP
accountants, and the audit's empirical lower bound is recorded next to it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def step_times(batch_size: int, mode: str | None, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per training step (and peak memory) of AdPredictorNN; mode None = non-DP."""
    from within.lit.dp import RowLoss, row_losses
    from within.nn.predictor import AdPredictorNN
    from within.privacy.engine import make_private

    torch.manual_seed(0)
    input_dim = {"n_num": 8, "cat_cardinalities": [50, 20, 200, 10, 6, 4], "text_fields": 2, "text_buckets": 4096,
                 "image_fields": 1, "image_channels": 3, "image_size": 16}
    net = AdPredictorNN(input_dim, dp_compatible=mode is not None).to(device)
    batch = {k: v.to(device) for k, v in AdPredictorNN.example_batch(input_dim, batch_size, seed=1).items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    pt = None
    if mode is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(batch_size * 10)),
                                             batch_size=batch_size)
        pt = make_private(net, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
                          expected_batch_size=batch_size, delta=1e-6, grad_sample_mode=mode, criterion=RowLoss())
        opt = pt.optimizer

    def step() -> None:
        logits = net(batch).float()
        if pt is not None and pt.criterion is not None:
            pt.criterion(logits, batch["label"], batch["weight"]).backward()
        else:
            row_losses(logits, batch["label"], batch["weight"]).mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up (allocations, first-call dispatch)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak_rss = rss0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peak_rss = max(peak_rss, proc.memory_info().rss)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss - rss0
    if pt is not None:
        pt.close()
    return {"step_s": statistics.median(times), "peak_mem_mb": peak / 2**20,
            "grad_sample_mode": pt.grad_sample_mode if pt is not None else None}


UTILITY_EPSILONS = (float("inf"), 8.0, 3.0, 1.0)
RUNS = ROOT / "outputs" / "dp_utility"
UTILITY_JSON = OUT / "dp_utility.json"


def _eps_name(eps: float) -> str:
    return "inf" if not np.isfinite(eps) else f"{eps:g}"


def run_overrides(eps: float, extra: list[str]) -> list[str]:
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
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    row = {"target_epsilon": eps, "run_dir": str(run_dir.relative_to(ROOT)), "overrides": overrides,
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


def privacy_utility(epsilons: list[float], extra: list[str]) -> list[dict]:
    """One full train.py run per epsilon (resumable); returns the table rows, inf first."""
    import subprocess
    import sys

    prior = {r["target_epsilon"]: r for r in _load_rows()}
    rows = []
    for eps in epsilons:
        run_dir = RUNS / f"eps_{_eps_name(eps)}"
        overrides = run_overrides(eps, extra)
        done = (run_dir / "report" / "metrics.json").is_file()
        meta = run_dir / "benchmark_overrides.json"
        # a DP run is also keyed by privacy=dp's defaults file: changing a DP default reruns it
        signature = overrides + ([_dp_defaults_hash()] if np.isfinite(eps) else [])
        same = meta.is_file() and json.loads(meta.read_text()) == signature
        if not (done and same):
            if run_dir.exists() and not same:
                import shutil

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
        _save_rows(_merge(prior, rows))  # after every run: a killed sweep keeps what it has
    return _merge(prior, rows)


def _dp_defaults_hash() -> str:
    import hashlib

    return "conf/privacy/dp.yaml sha256:" + hashlib.sha256((ROOT / "conf" / "privacy" / "dp.yaml").read_bytes()).hexdigest()


def _merge(prior: dict, rows: list[dict]) -> list[dict]:
    by_eps = {**prior, **{r["target_epsilon"]: r for r in rows}}
    return [by_eps[e] for e in sorted(by_eps, key=lambda e: -e)]  # inf, 8, 3, 1


def _load_rows() -> list[dict]:
    if not UTILITY_JSON.is_file():
        return []
    rows = json.loads(UTILITY_JSON.read_text())["rows"]
    for r in rows:
        r["target_epsilon"], r["epsilon"] = float(r["target_epsilon"]), float(r["epsilon"])
    return rows


def _save_rows(rows: list[dict]) -> None:
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
           "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
           "rows": strict, "summary": summary}
    OUT.mkdir(parents=True, exist_ok=True)
    UTILITY_JSON.write_text(json.dumps(out, indent=2, default=float))


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


def write_table_and_plot() -> None:
    data = json.loads(UTILITY_JSON.read_text())
    rows = _load_rows()
    (OUT / "dp_utility.md").write_text(markdown(rows, data["summary"]))
    plot(rows, OUT / "dp_privacy_utility.png")
    print((OUT / "dp_utility.md").read_text())


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="ghost,hooks,functorch")
    ap.add_argument("--skip-utility", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--table", action="store_true", help="only regenerate dp_utility.md and the plot from the JSON")
    ap.add_argument("--epsilons", default="inf,8,3,1", help="comma list; inf = the non-DP run")
    ap.add_argument("--override", action="append", default=[],
                    help="extra train.py override for every utility run (e.g. data.source.n=100000 for a smoke run)")
    args = ap.parse_args()
    if args.table:
        write_table_and_plot()
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.skip_overhead:
        overhead = []
        for bs in (256, 1024):
            base = step_times(bs, None, args.repeats, device)
            overhead.append({"batch_size": bs, "mode": "non_dp", **base, "ratio": 1.0})
            for mode in args.modes.split(","):
                r = step_times(bs, mode, args.repeats, device)
                overhead.append({"batch_size": bs, "mode": mode, **r, "ratio": r["step_s"] / base["step_s"]})
                print(overhead[-1], flush=True)
        result = {"device": device, "torch_threads": torch.get_num_threads(), "overhead": overhead}
        (OUT / "dp_overhead.json").write_text(json.dumps(result, indent=2, default=float))
        print(json.dumps(result, indent=2, default=float))
    if not args.skip_utility:
        epsilons = [float(e) for e in args.epsilons.split(",")]
        privacy_utility(epsilons, list(args.override))
        write_table_and_plot()


if __name__ == "__main__":
    main()
