"""Streaming at scale: peak memory and training speed against the number of simulator rows.

For each n, `python train.py data=synthetic data.source.n=<n> data.stream=true trainer.max_epochs=1`
runs in its own subprocess (one DataLoader worker makes the batches while the main process trains);
this process samples the memory of that process tree with psutil every 0.5 s. Memory is the sum of
PSS over the tree (a forked worker shares pages with its parent; RSS would count them twice), and
the main process's own peak RSS (getrusage) is recorded beside it. Speed is train rows / the
training epoch's wall time (validation excluded), measured by a callback in the child.

Acceptance (issue 17): the largest n's peak memory within 1.2x of the smallest n's, and its samples/s
within 10% of it (ratios against the smallest n, measured in the same run).

`--mode data` makes the same datamodule and reads the train stream once without a model: the data
path's own memory and speed, when a full training epoch per n does not fit the time at hand.

Writes benchmarks/results/streaming_scale.{json,md,png}.

    nice -n 10 python -m benchmarks.streaming_scale [--rows 1000000 3000000 10000000] [--mode data]
    python -m benchmarks.streaming_scale --rows 100000 200000 --results-dir /tmp/ss   # a trial run
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks.common import ROOT, load_average, machine, parser, write_json, write_markdown

NAME = "streaming_scale"


class EpochTimer(L.Callback):
    """Writes the first training epoch's wall time (start to its last batch) and batches to `path`."""

    def __init__(self, path: str) -> None:
        self.path, self.start, self.last, self.batches, self.rows = Path(path), 0.0, 0.0, 0, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.last = time.perf_counter()
        self.batches += 1
        self.rows += len(batch["label"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.path.exists():
            self.path.write_text(json.dumps({"train_seconds": self.last - self.start, "batches": self.batches,
                                             "rows": self.rows}))


def child_data(n: int, out: Path, workers: int) -> None:
    """`--mode data`: the same datamodule (processor fitted, eval slices held), one pass over the train
    stream without a model: what the data path alone costs in memory and time."""
    from benchmarks.common import compose
    from within.pipeline.data import build_datamodule

    cfg = compose([f"data.source.n={n}", "data.stream=true", f"data.num_workers={workers}"], out)
    start = time.perf_counter()
    dm = build_datamodule(cfg)
    dm.setup("fit")
    t0, batches, rows = time.perf_counter(), 0, 0
    for batch in dm.train_dataloader():
        batches, rows = batches + 1, rows + len(batch["label"])
    end = time.perf_counter()
    (out / "child.json").write_text(json.dumps({
        "train_seconds": end - t0, "batches": batches, "rows": rows, "run_seconds": end - start,
        "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "test_auc": None, "test_logloss": None, "val_logloss": None,
    }))


def child(n: int, out: Path, workers: int) -> None:
    """One run (in the subprocess): train on n streamed rows, then write child.json beside the run."""
    from benchmarks.common import train

    timer = out / "epoch.json"
    run = train([f"data.source.n={n}", "data.stream=true", f"data.num_workers={workers}", "trainer.max_epochs=1",
                 "postfit=[]", f"+callbacks.epoch_timer._target_={__name__}.EpochTimer",
                 f"+callbacks.epoch_timer.path={timer}"], out)
    epoch = json.loads(timer.read_text())
    (out / "child.json").write_text(json.dumps({
        **epoch, "run_seconds": run.seconds, "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "test_auc": run.metrics.get("test/auc"), "test_logloss": run.metrics.get("test/logloss"),
        "val_logloss": run.metrics.get("val/logloss"),
    }))


def measure(n: int, workers: int, mode: str = "train", poll_s: float = 0.5) -> dict[str, Any]:
    """Run `child` for n rows in a subprocess; its peak tree memory and what it reports."""
    import psutil

    with tempfile.TemporaryDirectory(prefix=f"stream_{n}_") as tmp:
        out = Path(tmp)
        cmd = [sys.executable, "-m", f"benchmarks.{NAME}", "--child", str(n), "--child-out", str(out),
               "--workers", str(workers), "--mode", mode]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root, peak_pss, peak_rss = psutil.Process(proc.pid), 0.0, 0.0
        while proc.poll() is None:
            pss = rss = 0.0
            try:
                for p in [root, *root.children(recursive=True)]:
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(poll_s)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"streaming_scale: the n={n} run failed (exit {proc.returncode}):\n{err[-3000:]}")
        rep = json.loads((out / "child.json").read_text())
    train_rows = rep["rows"]
    return {"n": n, "train_rows": train_rows, "peak_pss_mb": peak_pss / 2**20, "peak_rss_sum_mb": peak_rss / 2**20,
            "main_maxrss_mb": rep["main_maxrss_mb"], "train_seconds": rep["train_seconds"],
            "samples_per_s": train_rows / rep["train_seconds"], "batches": rep["batches"],
            "run_seconds": rep["run_seconds"], "wall_seconds": time.perf_counter() - start,
            "test_auc": rep["test_auc"], "test_logloss": rep["test_logloss"], "val_logloss": rep["val_logloss"]}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] / 1e6 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(n, [r["peak_pss_mb"] for r in rows], "o-", label="process tree (PSS)")
    a.plot(n, [r["main_maxrss_mb"] for r in rows], "s--", label="main process (max RSS)")
    a.set(xlabel="rows (millions)", ylabel="peak memory (MiB)", ylim=(0, None), title="Memory")
    a.legend(fontsize=8)
    b.plot(n, [r["train_seconds"] for r in rows], "o-", color="C2")
    b.set(xlabel="rows (millions)", ylabel="training epoch (s)", ylim=(0, None), title="Time (1 epoch)")
    for r, x in zip(rows, n):
        b.annotate(f"{r['samples_per_s'] / 1e3:.1f}k/s", (x, r["train_seconds"]), fontsize=8,
                   textcoords="offset points", xytext=(4, -10))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers making the batches")
    ap.add_argument("--mode", choices=["train", "data"], default="train",
                    help="train: 1 epoch of model=nn; data: one pass over the train stream, no model")
    ap.add_argument("--child", type=int, default=None, help=argparse_hidden())
    ap.add_argument("--child-out", type=Path, default=None, help=argparse_hidden())
    args = ap.parse_args()
    if args.child is not None:
        (child if args.mode == "train" else child_data)(args.child, args.child_out, args.workers)
        return
    from rich.progress import track

    rows = []
    for n in track(sorted(args.rows), description="streamed runs"):
        rows.append(measure(n, args.workers, args.mode))
        print(json.dumps(rows[-1]), flush=True)
    base, top = rows[0], rows[-1]
    result = {
        "rows": rows, "mode": args.mode, "workers": args.workers, "baseline_n": base["n"], "largest_n": top["n"],
        "memory_ratio": top["peak_pss_mb"] / base["peak_pss_mb"],
        "main_rss_ratio": top["main_maxrss_mb"] / base["main_maxrss_mb"],
        "speed_ratio": top["samples_per_s"] / base["samples_per_s"],
        "targets": {"memory_ratio_max": 1.2, "speed_ratio_min": 0.9},
        "load_average": load_average(), "machine": machine(),
    }
    result["met"] = result["memory_ratio"] <= 1.2 and result["speed_ratio"] >= 0.9
    path = write_json(NAME, result, args.results_dir)
    plot(rows, path.with_suffix(".png"))
    what = "1 epoch of model=nn" if args.mode == "train" else "one pass over the train stream, no model"
    lines = [f"Mode: {args.mode} ({what}), {args.workers} DataLoader worker(s).", "",
             "| rows | train rows | peak PSS (MiB) | main max RSS (MiB) | epoch (s) | samples/s | test AUC |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']:,} | {r['train_rows']:,} | {r['peak_pss_mb']:.0f} | {r['main_maxrss_mb']:.0f} | "
              f"{r['train_seconds']:.0f} | {r['samples_per_s']:,.0f} | "
              f"{'-' if r['test_auc'] is None else format(r['test_auc'], '.4f')} |" for r in rows]
    lines += ["", (f"{top['n']:,} rows against {base['n']:,}: memory {result['memory_ratio']:.2f}x (target <= 1.2), "
                   f"samples/s {result['speed_ratio']:.2f}x (target >= 0.9); load average {result['load_average']}.")]
    write_markdown(NAME, "\n".join(lines) + "\n", args.results_dir)
    print(path)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
