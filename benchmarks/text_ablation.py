"""Text encoder ablation: text_model=hashing vs text_model=minilm through the full train pipeline.

For each dataset and text model, runs `run_train` (same config otherwise; postfit=[calibrate,
export], no ONNX) and records test AUC / logloss, training wall time (the minilm figure includes
embedding every distinct string with a cold cache, also timed alone as `embed_s_cold`), and
inference latency of the saved bundle: `predict` on 1,000 test rows (warm cache) and on one record
with a never-seen headline (one MiniLM forward pass).

Datasets: the simulator (`data=synthetic`, `--sim-rows` rows; its text is pseudo-words, so a
pretrained language model has no prior to bring), and advertising.csv (`data=advertising`,
1,000 generated rows with English-like ad topics) when ../shared/data holds it.

    python benchmarks/text_ablation.py     # writes benchmarks/results/text_ablation.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("WITHIN_DATA_DIR", ROOT.parent / "shared" / "data"))


def compose(overrides: list[str], out_dir: Path):
    from within.pipeline.api import compose_config

    return compose_config(overrides, output_dir=out_dir, data_dir=DATA_DIR)


def run_one(data_overrides: list[str], text_model: str, work: Path, epochs: int, seed: int) -> dict:
    import within.pipeline  # noqa: F401  (registers resolvers)
    from within.models.predictor import AdScorePredictor
    from within.pipeline.train import build_datamodule, run_train

    out = work / f"{data_overrides[0].split('=')[1]}_{text_model}"
    cache = work / "cache"  # cold: every run embeds its strings from scratch
    overrides = data_overrides + [
        f"text_model={text_model}", f"trainer.max_epochs={epochs}", "postfit=[calibrate,export]", "export.onnx=false",
        "extras.print_config=false", "logger=csv", f"seed={seed}",
    ] + ([f"text_model.cache_dir={cache}"] if text_model != "hashing" else [])
    cfg = compose(overrides, out)
    embed_s, n_strings = 0.0, None
    if text_model != "hashing":
        from within.features.text_models import TextEmbedder

        # the embedding step alone, on its own cold cache (the run below embeds again, also cold)
        dm = build_datamodule(cfg)
        df = dm.load_frame()
        strings = sorted({s for f in dm.spec.text for s in df[f.name].dropna().astype(str)})
        n_strings = len(strings)
        t0 = time.perf_counter()
        TextEmbedder(cfg.text_model.name, cache_dir=work / "probe_cache").encode(strings)
        embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_train(cfg)
    train_s = time.perf_counter() - t0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    pred = AdScorePredictor.load(out / "bundle")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    test = dm.frames["test"].iloc[:1000]
    pred.predict(test)  # warm up (loads the text model / cache once)
    t0 = time.perf_counter()
    for _ in range(3):
        pred.predict(test)
    batch_ms = (time.perf_counter() - t0) / 3 * 1000
    record = test.iloc[0].to_dict()
    field = dm.spec.text[0].name
    lat = []
    for i in range(5):
        record[field] = f"never seen headline number {i} {time.time_ns()}"
        t0 = time.perf_counter()
        pred.predict(record)
        lat.append(time.perf_counter() - t0)
    return {
        "test/auc": metrics.get("test/auc"), "test/logloss": metrics.get("test/logloss"),
        "train_s": train_s, "embed_s_cold": embed_s, "n_distinct_strings": n_strings,
        "predict_1000_rows_ms": batch_ms, "predict_one_new_record_ms": float(np.median(lat)) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-rows", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_ablation.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    datasets = {"simulator": ["data=synthetic", f"data.source.n={args.sim_rows}"]}
    if (DATA_DIR / "advertising_clicked_on_ad").exists():
        datasets["advertising"] = ["data=advertising"]
    result: dict = {
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "device": "cpu", "epochs": args.epochs, "seed": args.seed, "sim_rows": args.sim_rows, "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in datasets.items():
            result["results"][name] = {}
            for tm in ("hashing", "minilm"):
                r = run_one(overrides, tm, Path(tmp), args.epochs, args.seed)
                result["results"][name][tm] = r
                print(name, tm, json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
