"""DP-SGD overhead and privacy-utility trade-off for AdPredictorNN.

    python benchmarks/dp_overhead.py [--n 40000] [--epochs 3] [--repeats 5]

Writes benchmarks/results/dp_overhead.json and dp_privacy_utility.png:
- step time (forward + backward + optimizer step) and peak memory, non-DP vs DP, at batch
  256 and 1024, for each grad_sample_mode (ghost | hooks | functorch). CPU peak memory is the
  process's max RSS growth during the timed steps (psutil), GPU peak is torch.cuda's.
- test AUC at epsilon in {1, 3, 8, inf} on the default simulator (inf = the non-DP run), each
  trained through `within.pipeline.train.run_train` with the same settings but privacy.
The default n is below the simulator's default 300k rows so the whole script stays near 8 minutes on
a laptop CPU; pass --n to use more.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def step_times(batch_size: int, mode: str | None, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per training step (and peak memory) of AdPredictorNN; mode None = non-DP."""
    from within.lit.dp import row_losses, RowLoss
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


def privacy_utility(n: int, epochs: int) -> list[dict]:
    from tests.conftest import compose_cfg
    from within.pipeline.train import run_train

    rows = []
    for eps in (1.0, 3.0, 8.0, None):
        with tempfile.TemporaryDirectory() as tmp:
            over = [f"data.source.n={n}", f"trainer.max_epochs={epochs}", "extras.print_config=false",
                    "logger=none", "callbacks.early_stopping.patience=100", "postfit=[]"]
            if eps is not None:
                over += ["privacy=dp", f"privacy.target_epsilon={eps}", "privacy.audit.canaries=0"]
            t = time.perf_counter()
            run_train(compose_cfg("train", over, Path(tmp)))
            metrics = json.loads((Path(tmp) / "report" / "metrics.json").read_text())
            privacy = {}
            if eps is not None:
                privacy = json.loads((Path(tmp) / "report" / "privacy.json").read_text())
            rows.append({"target_epsilon": eps if eps is not None else float("inf"),
                         "epsilon": privacy.get("epsilon", float("inf")), "test_auc": metrics.get("test/auc"),
                         "oracle_auc": metrics.get("test/oracle_auc"), "seconds": time.perf_counter() - t,
                         "audit_mia_auc": privacy.get("audit/mia_auc")})
            print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["∞" if not np.isfinite(r["target_epsilon"]) else f"{r['target_epsilon']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(rows)), [r["test_auc"] for r in rows], "o-", label="test AUC")
    if rows and rows[0].get("oracle_auc"):
        ax.axhline(rows[0]["oracle_auc"], ls="--", c="gray", label="oracle AUC (true CTR)")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("target epsilon")
    ax.set_ylabel("test AUC")
    ax.set_title("DP-SGD privacy-utility (AdPredictorNN, simulator)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="ghost,hooks,functorch")
    ap.add_argument("--skip-utility", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    OUT.mkdir(parents=True, exist_ok=True)
    overhead = []
    for bs in (256, 1024):
        base = step_times(bs, None, args.repeats, device)
        overhead.append({"batch_size": bs, "mode": "non_dp", **base, "ratio": 1.0})
        for mode in args.modes.split(","):
            r = step_times(bs, mode, args.repeats, device)
            overhead.append({"batch_size": bs, "mode": mode, **r, "ratio": r["step_s"] / base["step_s"]})
            print(overhead[-1], flush=True)
    result = {"device": device, "torch_threads": torch.get_num_threads(), "overhead": overhead}
    if not args.skip_utility:
        rows = privacy_utility(args.n, args.epochs)
        result.update(n=args.n, epochs=args.epochs, privacy_utility=rows)
        plot(rows, OUT / "dp_privacy_utility.png")
    (OUT / "dp_overhead.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
