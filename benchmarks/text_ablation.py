"""Text encoder ablation: text_model=hashing vs text_model=minilm through the full train pipeline.

For each dataset and text model, runs `run_train` (same config otherwise; postfit=[calibrate,
export], no ONNX) and records test AUC / logloss, training wall time (the minilm figure includes
embedding every distinct string with a cold cache, also timed alone as `embed_s_cold`), and
inference latency of the saved bundle: `predict` on 1,000 test rows (warm cache) and on one record
with a never-seen headline (one MiniLM forward pass).

Datasets: the simulator (`data=synthetic`, `--sim-rows` rows; its text is pseudo-words, so a
pretrained language model has no prior to bring), and advertising.csv (`data=advertising`,
1,000 generated rows with English-like ad topics) when ../shared/data holds it.

    python -m benchmarks.text_ablation     # -> benchmarks/results/text_ablation.json
    python -m benchmarks.text_ablation --sim-rows 3000 --epochs 1 --results-dir /tmp/ta   # a trial run
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DATA_DIR, compose, machine, parser, train, write_json

NAME = "text_ablation"


def run_one(data_overrides: list[str], text_model: str, work: Path, epochs: int, seed: int) -> dict:
    out = work / f"{data_overrides[0].split('=')[1]}_{text_model}"
    cache = work / "cache"  # cold: every run embeds its strings from scratch
    overrides = data_overrides + [
        f"text_model={text_model}", f"trainer.max_epochs={epochs}", "postfit=[calibrate,export]", "export.onnx=false",
        f"seed={seed}",
    ] + ([f"text_model.cache_dir={cache}"] if text_model != "hashing" else [])
    embed_s, n_strings = 0.0, None
    if text_model != "hashing":
        from within.features.text_models import TextEmbedder
        from within.pipeline.data import build_datamodule

        # the embedding step alone, on its own cold cache (the run below embeds again, also cold)
        cfg = compose(overrides, out)
        dm = build_datamodule(cfg)
        strings = sorted({s for f in dm.spec.text for s in dm.load_frame()[f.name].dropna().astype(str)})
        n_strings = len(strings)
        t0 = time.perf_counter()
        TextEmbedder(cfg.text_model.name, cache_dir=work / "probe_cache").encode(strings)
        embed_s = time.perf_counter() - t0
    run = train(overrides, out)
    pred, spec = run.model, run.model.spec
    test = run.frames()["test"].iloc[:1000]
    pred.predict(test)  # warm up (loads the text model / cache once)
    t0 = time.perf_counter()
    for _ in range(3):
        pred.predict(test)
    batch_ms = (time.perf_counter() - t0) / 3 * 1000
    record = test.iloc[0].to_dict()
    field = spec.text[0].name
    lat = []
    for i in range(5):
        record[field] = f"never seen headline number {i} {time.time_ns()}"
        t0 = time.perf_counter()
        pred.predict(record)
        lat.append(time.perf_counter() - t0)
    return {
        "test/auc": run.metrics.get("test/auc"), "test/logloss": run.metrics.get("test/logloss"),
        "train_s": run.seconds, "embed_s_cold": embed_s, "n_distinct_strings": n_strings,
        "predict_1000_rows_ms": batch_ms, "predict_one_new_record_ms": float(np.median(lat)) * 1000,
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sim-rows", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = {"simulator": ["data=synthetic", f"data.source.n={args.sim_rows}"]}
    if (DATA_DIR / "advertising_clicked_on_ad").exists():
        datasets["advertising"] = ["data=advertising"]
    result: dict = {"machine": machine(), "epochs": args.epochs, "seed": args.seed, "sim_rows": args.sim_rows,
                    "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in datasets.items():
            result["results"][name] = {}
            for tm in ("hashing", "minilm"):
                r = run_one(overrides, tm, Path(tmp), args.epochs, args.seed)
                result["results"][name][tm] = r
                print(name, tm, r, flush=True)
    print(f"wrote {write_json(NAME, result, args.results_dir)}")


if __name__ == "__main__":
    main()
