"""Streaming at scale: peak memory and training speed against the number of simulator rows.

For each n, `python train.py data=synthetic data.source.n=<n> data.stream=true trainer.max_epochs=1`
runs in its own subprocess (one DataLoader worker makes the batches while the main process trains);
this process samples the memory of that process tree with psutil every 0.5 s. Memory is the sum of
PSS over the tree (a forked worker shares pages with its parent; RSS would count them twice), and
the main process's own peak RSS (getrusage) is recorded beside it. Speed is train rows / the
training epoch's wall time (validation excluded), measured by a callback in the child.

Acceptance (issue 17): the largest n's peak memory within 1.2x of the smallest n's, and its samples/s
within 10% of it (ratios against the smallest n, measured in the same run). This machine's speed
drifts by more than 10% over the minutes a 10M-row epoch takes, so the smallest n runs again after
the largest (`--bracket`, on by default) and its speed is the mean of both runs. The callback also
marks the time every 200k rows: the largest run's last 1M rows against its first 1M tell a slowdown
that grows with the rows read (a leak, a growing buffer) from drift between runs.

`--mode data` makes the same datamodule and reads the train stream once without a model: the data
path's own memory and speed, when a full training epoch per n does not fit the time at hand.

Writes benchmarks/results/streaming_scale.{json,md,png}.

    nice -n 10 python -m benchmarks.streaming_scale [--rows 1000000 3000000 10000000] [--mode data]
    python -m benchmarks.streaming_scale --rows 100000 200000 --results-dir /tmp/ss   # a trial run
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks.common import ROOT, load_average, machine, parser, write_json, write_markdown

NAME = "streaming_scale"
WINDOW_ROWS = 200_000  # EpochTimer's default mark spacing


class EpochTimer(L.Callback):
    """Writes the first training epoch's wall time (start to its last batch) and batches to `path`,
    with a (rows, seconds) mark every `window_rows` rows: the speed along the epoch, so a slowdown
    that grows with n shows as a falling curve and machine drift as scatter around a flat one."""

    def __init__(self, path: str, window_rows: int = WINDOW_ROWS) -> None:
        self.path, self.window_rows = Path(path), int(window_rows)
        self.start, self.last, self.batches, self.rows = 0.0, 0.0, 0, 0
        self.marks: list[tuple[int, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()
        self.marks = [(0, 0.0)]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.last = time.perf_counter()
        self.batches += 1
        self.rows += len(batch["label"])
        if self.rows - self.marks[-1][0] >= self.window_rows:
            self.marks.append((self.rows, self.last - self.start))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.path.exists():
            self.path.write_text(json.dumps({"train_seconds": self.last - self.start, "batches": self.batches,
                                             "rows": self.rows, "marks": self.marks}))


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
            "marks": rep.get("marks", []),
            "test_auc": rep["test_auc"], "test_logloss": rep["test_logloss"], "val_logloss": rep["val_logloss"]}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Memory and epoch time against n (every run a point, the line through each n's mean), and the
    largest run's speed window by window along its epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    x = [n / 1e6 for n in ns]

    def mean_of(key: str) -> list[float]:
        return [statistics.fmean(r[key] for r in rows if r["n"] == n) for n in ns]

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.4))
    for key, style, label in (("peak_pss_mb", "o-", "process tree (PSS)"), ("main_maxrss_mb", "s--", "main process (max RSS)")):
        line, = a.plot(x, mean_of(key), style, label=label)
        a.scatter([r["n"] / 1e6 for r in rows], [r[key] for r in rows], color=line.get_color(), s=12)
    a.set(xlabel="rows (millions)", ylabel="peak memory (MiB)", ylim=(0, None), title="Memory")
    a.legend(fontsize=8)
    b.plot(x, mean_of("train_seconds"), "o-", color="C2")
    b.scatter([r["n"] / 1e6 for r in rows], [r["train_seconds"] for r in rows], color="C2", s=12)
    b.set(xlabel="rows (millions)", ylabel="training epoch (s)", ylim=(0, None), title="Time (1 epoch)")
    for r in rows:
        b.annotate(f"{r['samples_per_s'] / 1e3:.1f}k/s", (r["n"] / 1e6, r["train_seconds"]), fontsize=8,
                   textcoords="offset points", xytext=(4, -10))
    top = [r for r in rows if r["n"] == ns[-1]][-1]
    speeds = window_speeds(top.get("marks") or [])
    if speeds:
        c.plot([e / 1e6 for e, _ in speeds], [v / 1e3 for _, v in speeds], ".-", color="C3", lw=0.8)
        for r in rows:
            if r["n"] == ns[0]:
                c.axhline(r["samples_per_s"] / 1e3, color="grey", ls=":", lw=1)
    else:
        c.text(0.5, 0.5, "epoch shorter than two windows", ha="center", va="center", transform=c.transAxes)
    c.set(xlabel="train rows read (millions)", ylabel="samples/s (thousands)", ylim=(0, None),
          title=f"Along the {ns[-1] / 1e6:g}M-row epoch (dotted: {ns[0] / 1e6:g}M runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers making the batches")
    ap.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                    help="run the smallest n again after the largest; its speed is the mean of both runs")
    ap.add_argument("--mode", choices=["train", "data"], default="train",
                    help="train: 1 epoch of model=nn; data: one pass over the train stream, no model")
    ap.add_argument("--child", type=int, default=None, help=argparse_hidden())
    ap.add_argument("--child-out", type=Path, default=None, help=argparse_hidden())
    args = ap.parse_args()
    if args.child is not None:
        (child if args.mode == "train" else child_data)(args.child, args.child_out, args.workers)
        return
    from rich.progress import track

    order = sorted(args.rows)
    if args.bracket and len(order) > 1:
        order.append(order[0])  # the smallest n again last: its two runs bracket the others in time
    rows = []
    for n in track(order, description="streamed runs"):
        rows.append(measure(n, args.workers, args.mode))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "marks"}), flush=True)
    print(write_results(rows, args.mode, args.workers, args.results_dir))


def write_results(rows: list[dict[str, Any]], mode: str, workers: int, results_dir: Any,
                  load: list[float] | None = None) -> Path:
    """streaming_scale.{json,md,png} from the runs' rows."""
    result = summarise(rows)
    result.update({"mode": mode, "workers": workers, "load_average": load or load_average(), "machine": machine()})
    path = write_json(NAME, result, results_dir)
    plot(rows, path.with_suffix(".png"))
    what = "1 epoch of model=nn" if mode == "train" else "one pass over the train stream, no model"
    lines = [f"Mode: {mode} ({what}), {workers} DataLoader worker(s).", "",
             "| rows | train rows | peak PSS (MiB) | main max RSS (MiB) | epoch (s) | samples/s | test AUC |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']:,} | {r['train_rows']:,} | {r['peak_pss_mb']:.0f} | {r['main_maxrss_mb']:.0f} | "
              f"{r['train_seconds']:.0f} | {r['samples_per_s']:,.0f} | "
              f"{'-' if r['test_auc'] is None else format(r['test_auc'], '.4f')} |" for r in rows]
    lines += ["", (f"{result['largest_n']:,} rows against {result['baseline_n']:,}: memory {result['memory_ratio']:.2f}x "
                   f"(target <= 1.2), samples/s {result['speed_ratio']:.2f}x against the mean of the "
                   f"{result['baseline_runs']} baseline run(s) (target >= 0.9); load average {result['load_average']}.")]
    if result.get("tail_vs_head") is not None:
        lines.append(f"Along the {result['largest_n']:,}-row epoch: the last {result['window_rows']:,} train rows ran at "
                     f"{result['tail_vs_head']:.2f}x the speed of the first {result['window_rows']:,}; "
                     f"{WINDOW_ROWS // 1000}k-row windows scatter by {result['window_cv']:.0%} (sd/mean).")
    write_markdown(NAME, "\n".join(lines) + "\n", results_dir)
    return path


def window_speeds(marks: list[list[float]]) -> list[tuple[int, float]]:
    """(rows at the window's end, samples/s in the window) from an EpochTimer's marks."""
    return [(int(b[0]), (b[0] - a[0]) / (b[1] - a[1])) for a, b in zip(marks, marks[1:]) if b[1] > a[1]]


def rows_speed(marks: list[list[float]], lo: int, hi: int) -> float | None:
    """Samples/s between the first marks at or past `lo` and `hi` rows (None when no mark reaches them)."""
    at = [m for m in marks if m[0] >= lo]
    end = [m for m in marks if m[0] >= hi]
    if not at or not end or end[0][1] <= at[0][1]:
        return None
    return (end[0][0] - at[0][0]) / (end[0][1] - at[0][1])


def summarise(rows: list[dict[str, Any]], head_rows: int = 1_000_000) -> dict[str, Any]:
    """Ratios of the largest n against the smallest (its runs averaged: with `--bracket` one before and
    one after the rest), and the largest run's speed along its own epoch: the last `head_rows` train rows
    against the first, which no drift between runs can explain (a slowdown that grows with rows read would
    show there)."""
    small, large = min(r["n"] for r in rows), max(r["n"] for r in rows)
    base = [r for r in rows if r["n"] == small]
    top = [r for r in rows if r["n"] == large][-1]
    base_speed = statistics.fmean(r["samples_per_s"] for r in base)
    out: dict[str, Any] = {
        "rows": rows, "baseline_n": small, "largest_n": large, "baseline_runs": len(base),
        "memory_ratio": top["peak_pss_mb"] / base[0]["peak_pss_mb"],
        "main_rss_ratio": top["main_maxrss_mb"] / base[0]["main_maxrss_mb"],
        "speed_ratio": top["samples_per_s"] / base_speed,
        "baseline_speeds": [r["samples_per_s"] for r in base],
        "targets": {"memory_ratio_max": 1.2, "speed_ratio_min": 0.9},
    }
    out["met"] = out["memory_ratio"] <= 1.2 and out["speed_ratio"] >= 0.9
    marks, n_train = top.get("marks") or [], top["train_rows"]
    window = min(head_rows, n_train // 4)
    head = rows_speed(marks, 0, window) if marks else None
    tail = rows_speed(marks, marks[-1][0] - window, marks[-1][0]) if marks else None
    speeds = [v for _, v in window_speeds(marks)]
    out.update({"window_rows": window, "tail_vs_head": None if head is None or tail is None else tail / head,
                "window_cv": statistics.pstdev(speeds) / statistics.fmean(speeds) if len(speeds) > 1 else None})
    return out


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
