"""What every benchmark shares: where results, runs and data live; composing, training and loading a
run as `train.py` does; the default simulator runs the run-reading benchmarks study; image summaries
and the gradient-boosting baseline two benchmarks fit; the command line; JSON output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "outputs" / "benchmarks"  # runs a benchmark trains once and reuses (git-ignored)
DATA_DIR = Path(os.environ.get("WITHIN_DATA_DIR", ROOT.parent / "shared" / "data"))

# No console output from a run: no config tree, progress bar, model summary, logger or LR monitor.
# A benchmark that reads the CSV log adds `logger=csv` after these (the last group choice wins).
QUIET = (
    "extras.print_config=false", "extras.ignore_warnings=true", "logger=none",
    "callbacks.rich_progress_bar=null", "callbacks.lr_monitor=null",
    "++trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
)
IMAGE_SUMMARIES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "lum_std")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The module's command line: its docstring as help, and --results-dir (a temp dir for trial runs)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", type=Path, default=RESULTS,
                    help=f"where the JSON / markdown go (default {RESULTS.relative_to(ROOT)}; use a temp dir "
                         "for a trial run, so the committed results keep their figures)")
    return ap


def compose(overrides: Sequence[str] = (), out_dir: Path | str | None = None, config_name: str = "train") -> Any:
    """conf/<config_name>.yaml plus overrides, as `train.py` composes it, with the shared data folder."""
    from within.pipeline.compose import compose_config

    return compose_config(list(overrides), output_dir=out_dir, data_dir=DATA_DIR, config_name=config_name)


@dataclasses.dataclass
class TrainedRun:
    """A finished `run_train`: its directory, config, the bundle's model and report/metrics.json."""

    out_dir: Path
    cfg: Any
    model: Any
    metrics: dict[str, float]
    seconds: float
    source: Any = None  # the DataFrame it trained on when not the configured source

    def frames(self) -> dict[str, Any]:
        """The run's train / val / calib / test rows, split again from its config (no tensors)."""
        from within.pipeline.data import build_datamodule

        return build_datamodule(self.cfg, self.source).split()


def train(overrides: Sequence[str], out_dir: Path | str, source: Any = None) -> TrainedRun:
    """`python train.py <overrides>` in this process (QUIET first), writing into `out_dir`; `source` (a
    DataFrame) replaces the configured data. Returns the run with its bundle loaded."""
    from within.models.base import BaseMLModel
    from within.pipeline.train import run_train

    for name in ("lightning.pytorch", "lightning.fabric"):  # no "GPU available" or "Seed set" lines per run
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(out_dir)
    cfg = compose([*QUIET, *overrides], out)
    start = time.perf_counter()
    run_train(cfg, source=source)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    return TrainedRun(out_dir=out, cfg=cfg, model=BaseMLModel.load(out / "bundle"), metrics=metrics,
                      seconds=seconds, source=source)


def load_run(run: str | Path, flag: str = "--run") -> tuple[Any, dict[str, Any]]:
    """(model, bundle metadata) of a run directory written by train.py; `flag` names the argument in errors."""
    from within.models.base import BaseMLModel

    bundle = Path(run) / "bundle"
    if not (bundle / "metadata.json").is_file():
        raise SystemExit(f"{flag}: {bundle} has no metadata.json; pass a run directory written by train.py")
    model = BaseMLModel.load(bundle)
    return model, model.metadata


def simulator_run(seed: int, sample_seed: int | None = None) -> Path:
    """The default `python train.py seed=<seed>` run (with `data.source.sample_seed`: other rows of the
    same world), trained once into outputs/benchmarks/ and reused; a killed one resumes from last.ckpt."""
    out = RUNS / (f"simulator_seed{seed}" + ("" if sample_seed is None else f"_sample{sample_seed}"))
    if not (out / "report" / "metrics.json").is_file():
        rows = [] if sample_seed is None else [f"data.source.sample_seed={sample_seed}"]
        print(f"training {repo_path(out)} (the default simulator run, seed {seed})", flush=True)
        train([f"seed={seed}", "ckpt_path=auto", *rows], out)
    return out


def fresh_sample(metadata: dict[str, Any], rows: int, sample_seed: int) -> Any:
    """`rows` new impressions of a simulator run's world (its data.source with another sample seed)."""
    from within.data.simulator import simulate

    source = dict(metadata["config"]["data"]["source"])
    if "simulator" not in str(source.get("_target_", "")):
        raise SystemExit(f"--run: needs a simulator run (data=synthetic); this one used {source.get('_target_')}")
    kwargs = {k: v for k, v in source.items() if not k.startswith("_")}
    kwargs.update(n=int(rows), sample_seed=int(sample_seed))
    return simulate(**kwargs)


def image_summaries(values: Any) -> np.ndarray:
    """[N, 7] per-channel mean / std and luminance std (IMAGE_SUMMARIES) of an image column, in [0, 1]
    pixel units; NaN for a missing image. Computed once per distinct image object (an ad's rows share it)."""
    obj = np.fromiter(values, dtype=object, count=len(values))  # 1-D even when every image has one shape
    out = np.full((len(obj), len(IMAGE_SUMMARIES)), np.nan)
    present = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in obj], dtype=bool)
    if present.any():
        ids = np.fromiter((id(v) for v in obj[present]), np.int64, int(present.sum()))
        _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        imgs = np.stack([np.asarray(obj[present][i]) for i in first]).astype(np.float64)
        if imgs.max() > 1.0:
            imgs = imgs / 255.0
        lum = imgs.mean(axis=1).reshape(len(imgs), -1).std(axis=1, keepdims=True)
        out[present] = np.concatenate([imgs.mean(axis=(2, 3)), imgs.std(axis=(2, 3)), lum], axis=1)[inv.reshape(-1)]
    return out


def hgb_classifier(seed: int, categorical_features: Any, max_iter: int = 300) -> Any:
    """The gradient-boosting baseline both simulator_modalities and real_data fit (same settings)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=max_iter, learning_rate=0.08, max_leaf_nodes=31, min_samples_leaf=100, l2_regularization=1.0,
        categorical_features=categorical_features, early_stopping=True, validation_fraction=0.1,
        n_iter_no_change=20, random_state=seed)


def repo_path(path: str | Path) -> str:
    """`path` relative to the repository root when it lies inside it (results name runs portably)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict[str, Any]:
    """Where a figure was measured: timings are only comparable within one run on one machine."""
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}


def write_json(name: str, result: dict[str, Any], results_dir: Path | None = None) -> Path:
    """<results_dir>/<name>.json (default benchmarks/results/), indented, NaN as null."""
    out = Path(results_dir or RESULTS) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(result), indent=2) + "\n")
    return out


def write_markdown(name: str, table: str, results_dir: Path | None = None) -> Path:
    """<results_dir>/<name>.md: the human-readable table a benchmark generates from its JSON."""
    out = Path(results_dir or RESULTS) / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return out


def read_json(name: str, results_dir: Path | None = None) -> dict[str, Any] | None:
    """<results_dir>/<name>.json as written by write_json, or None when there is none yet."""
    path = Path(results_dir or RESULTS) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _clean(obj.item())
    return obj


# ---- the serving benchmarks (predict_latency, serve_load) -----------------------------------------
SERVING_TRAIN = {  # one short epoch: the figures are about the serving path, not the model's quality
    "ipinyou": ["data=ipinyou", "trainer.max_epochs=1", "extras.print_config=false"],
    "synthetic": ["data.source.n=20000", "trainer.max_epochs=1", "extras.print_config=false"],
}


def load_average() -> list[float]:
    """The 1/5/15-minute load averages: how busy the machine was around a timing."""
    return [round(x, 2) for x in os.getloadavg()]


def train_bundle(data: str, out: Path) -> Path:
    """A one-epoch bundle of `data` (ipinyou or synthetic) for the serving benchmarks; returns bundle/."""
    from within.pipeline.train import run_train

    run_train(compose(SERVING_TRAIN[data] + ["postfit=[calibrate,intervals,export]"], out_dir=out))
    return out / "bundle"


def sample_records(model: Any, data: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows the model never trained on, as record dicts of its spec's fields."""
    names = model.processor.spec.names
    if data == "ipinyou":
        from within.data.loaders.ipinyou import load

        df = load(DATA_DIR / "ipinyou_deepctr_sample").sample(n=n, random_state=seed)
    else:
        from within.data.simulator import simulate

        df = simulate(n=n, seed=1000 + seed)
    return df[names].to_dict("records")


def plain_epoch(net: Any, optimizer: Any, batches: Any) -> float:
    """One epoch of a bare PyTorch loop (forward, binomial loss, backward, step): samples/s, the
    ceiling the Lightning path is measured against."""
    from within.lit.losses import binomial_logloss

    net.train()
    n, start = 0, time.perf_counter()
    for batch in batches:
        logits = net(batch).float()
        loss = binomial_logloss(logits, batch["label"], batch["weight"]) / batch["weight"].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += len(logits)
    return n / (time.perf_counter() - start)
