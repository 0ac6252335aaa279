"""within vs LogisticRegression vs HistGradientBoosting on real ad data and on the default simulator.

For each dataset the three models see the SAME rows, split and features:

* ``within``: model=nn through the real training pipeline (``run_train`` on the Hydra config that
  ``python train.py data=<name> seed=<s>`` composes, post-fit step ``calibrate`` only, so the
  probabilities are the calibrated ones a user gets). The benchmark fixes the split itself and hands
  ``run_train`` the rows in split order (``data.split.method=time`` with ``features.time=null`` and
  exact fractions), so within trains on train, early-stops on val, calibrates on calib (when the data
  config has one) and is scored on test;
* ``lr``: sklearn LogisticRegression on one-hot categoricals (same ``min_count`` as the spec),
  standardised numerics (the spec's transform, median imputation + missing indicator), hashed
  bag-of-words for text and image summaries; C picked from a small grid on within's val split;
* ``hgb_hashed`` (datasets with text): sklearn HistGradientBoostingClassifier on native categoricals
  (the 254 most frequent values of each field, the rest pooled), numerics, hashed text (8
  TruncatedSVD components of each text field's hashed bag of words) and image summaries
  (per-channel mean / std, luminance std): the baseline issue 3's simulator acceptance names
  ("HistGradientBoosting gets hashed-text and image summary features");
* ``hgb``: the same plus, per text field, a cross-fitted logistic-regression score on the hashed bag
  of words (stacking: a learned text model handed to the trees). Stronger than the issue asks; the
  table reports within against both.

Both baselines train on every non-test row (within's train + val + calib). Aggregated rows (clicks
out of impressions, ``features.weight``) are weighted by impressions in fitting and in every metric.

Protocols: ``kfold`` (5 random folds, fixed permutation; the test fold is held out, within's val /
calib come from the rest) for the small sets (iPinYou 26.7k rows, KAG 1.1k, advertising 1k);
``seeds`` (the data config's own split; seeds 0, 1, 2 change model init, HGB's random state and the
split when it is random) for criteo, avazu and the simulator (one seed by default: ~3 min per run).

Metrics per run: AUC, logloss, calibration ratio (sum p / sum y) on test; reported as mean ± sd
(sample sd, ddof=1) over folds / seeds.

    python -m benchmarks.real_data                          # all datasets -> results/real_data.{json,md}
    python -m benchmarks.real_data --datasets ipinyou,criteo
    python -m benchmarks.real_data --datasets simulator --sim-world 11   # -> results/real_data_world11.*
    python -m benchmarks.real_data --quick                  # 2 folds / seeds, small simulator -> results/real_data_quick.*
    python -m benchmarks.real_data --table                  # rewrite the markdown from the JSON only
    python -m benchmarks.real_data --datasets kag_conversion --quick --results-dir /tmp/rd   # a trial run

Resumable: datasets already in the JSON are skipped unless ``--force``; ``--extend`` runs only the
folds / seeds a dataset lacks (``--datasets simulator --sim-seeds 2 --extend`` adds a second seed).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from benchmarks.common import (
    DATA_DIR,
    IMAGE_SUMMARIES,
    compose,
    hgb_classifier,
    image_summaries,
    machine,
    parser,
    read_json,
    train,
    write_json,
    write_markdown,
)
from within.features.processor import category_strings, numeric_transform

# name -> (data config, protocol, folder under DATA_DIR or None for the simulator)
DATASETS: dict[str, dict[str, Any]] = {
    "ipinyou": {"data": "ipinyou", "protocol": "kfold", "folder": "ipinyou_deepctr_sample"},
    "criteo": {"data": "criteo", "protocol": "seeds", "folder": "criteo_avazu_kaggle_head10k"},
    "avazu": {"data": "avazu", "protocol": "seeds", "folder": "criteo_avazu_kaggle_head10k"},
    "kag_conversion": {"data": "kag_conversion", "protocol": "kfold", "folder": "facebook_ad_conversions_KAG"},
    "advertising": {"data": "advertising", "protocol": "kfold", "folder": "advertising_clicked_on_ad"},
    "simulator": {"data": "synthetic", "protocol": "seeds", "folder": None},
}
MODELS = ("within", "within_ens", "lr", "hgb", "hgb_hashed")  # hgb_hashed only where the data has text
ENSEMBLE_DATASETS = ("simulator",)  # within_ens (model=ensemble, 3 nn members) costs 3 runs: simulator only
# Members of three model types (issue 4: "different seeds or model types"): the default nn, the nn with
# a DCN-v2 cross layer, and a more strongly regularised nn. Chosen from single runs on the seed-7 world,
# which is also this benchmark's world: their single-model test AUCs were equal (0.7726-0.7730).
ENSEMBLE_OVERRIDES = ["model=ensemble", "model.size=3",
                      ("model.member_overrides=[{model.net.cross_layers: 1}, "
                       "{model.optimizer.weight_decay: 0.05, model.net.dropout_rate: 0.2}]")]
METRICS = ("auc", "logloss", "calib_ratio")
LR_GRID = (0.01, 0.1, 1.0)
LR_GRID_MAX_ROWS = 100_000
TOKEN_PATTERN = r"[a-z0-9']+"  # the processor's hashing tokenizer splits words the same way
HGB_MAX_CATEGORIES = 254


# ---- config / data ---------------------------------------------------------------------------
def load_dataset(data: str, extra: list[str]) -> tuple[pd.DataFrame, Any, dict[str, float], str]:
    """(frame, FeatureSpec, split fractions, split method) of a data config."""
    from within.pipeline.data import build_datamodule

    cfg = compose([f"data={data}", *extra])
    dm = build_datamodule(cfg)
    df = dm.load_frame().reset_index(drop=True)
    fracs = {"val": dm.val_frac, "calib": dm.calib_frac, "test": dm.test_frac}
    return df, dm.spec, fracs, dm.split_method


def make_splits(df: pd.DataFrame, spec: Any, fracs: dict[str, float], method: str, protocol: str,
                n_runs: int, k: int = 5) -> list[dict[str, np.ndarray]]:
    """Row indices per split (train / val / calib / test) for each run (fold or seed)."""
    from within.data.datamodule import split_frame

    n = len(df)
    runs = []
    if protocol == "kfold":
        folds = np.array_split(np.random.default_rng(0).permutation(n), k)
        n_val, n_calib = round(n * fracs["val"]), round(n * fracs["calib"])
        for i in range(min(n_runs, k)):
            rest = np.concatenate([f for j, f in enumerate(folds) if j != i])
            n_train = len(rest) - n_val - n_calib
            runs.append({"train": rest[:n_train], "val": rest[n_train:n_train + n_val],
                         "calib": rest[n_train + n_val:], "test": folds[i]})
        return runs
    idx = pd.DataFrame({"_row": np.arange(n)})
    for col in {spec.time} - {None}:
        if col in df:
            idx[col] = df[col].to_numpy()
    for seed in range(n_runs):
        parts = split_frame(idx, spec, method, fracs["val"], fracs["test"], seed, fracs["calib"])
        runs.append({name: part["_row"].to_numpy() for name, part in parts.items()})
    return runs


# ---- metrics ---------------------------------------------------------------------------------
def labels(df: pd.DataFrame, spec: Any) -> tuple[np.ndarray, np.ndarray | None]:
    y = df[spec.label].to_numpy(dtype=np.float64)
    w = df[spec.weight].to_numpy(dtype=np.float64) if spec.weight else None
    return y, w


def score(p: np.ndarray, df: pd.DataFrame, spec: Any) -> dict[str, float]:
    from within.calibration.metrics import auc, calibration_ratio, logloss

    y, w = labels(df, spec)
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return {"auc": auc(p, y, weight=w), "logloss": logloss(p, y, weight=w),
            "calib_ratio": calibration_ratio(p, y, weight=w)}


def expand(y: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index, 0/1 label, sample weight): aggregated rows become a click row and a no-click row."""
    n = len(y)
    if w is None:
        return np.arange(n), y, np.ones(n)
    rows = np.concatenate([np.arange(n), np.arange(n)])
    lab = np.concatenate([np.ones(n), np.zeros(n)])
    sw = np.concatenate([y, w - y])
    keep = sw > 0
    return rows[keep], lab[keep], sw[keep]


# ---- baseline features -----------------------------------------------------------------------
def numeric_block(train: pd.DataFrame, test: pd.DataFrame, spec: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    cols_tr, cols_te, names = [], [], []
    for f in spec.numeric:
        xtr = numeric_transform(train[f.name].to_numpy(np.float64), f.transform)
        xte = numeric_transform(test[f.name].to_numpy(np.float64), f.transform)
        fin = np.isfinite(xtr)
        fill = float(np.median(xtr[fin])) if fin.any() else 0.0
        mtr, mte = ~np.isfinite(xtr), ~np.isfinite(xte)
        xtr, xte = np.where(mtr, fill, xtr), np.where(mte, fill, xte)
        mu, sd = xtr.mean(), xtr.std() or 1.0
        cols_tr.append((xtr - mu) / sd), cols_te.append((xte - mu) / sd), names.append(f.name)
        if mtr.any():
            cols_tr.append(mtr.astype(float)), cols_te.append(mte.astype(float)), names.append(f"{f.name}__missing")
    if not cols_tr:
        return np.zeros((len(train), 0)), np.zeros((len(test), 0)), []
    return np.stack(cols_tr, 1), np.stack(cols_te, 1), names


def image_block(train: pd.DataFrame, test: pd.DataFrame, spec: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-channel mean / std and luminance std of each image field (benchmarks.common.image_summaries)."""
    blocks_tr = [image_summaries(train[f.name].to_numpy(dtype=object)) for f in spec.image]
    blocks_te = [image_summaries(test[f.name].to_numpy(dtype=object)) for f in spec.image]
    names = [f"{f.name}_{s}" for f in spec.image for s in IMAGE_SUMMARIES]
    if not blocks_tr:
        return np.zeros((len(train), 0)), np.zeros((len(test), 0)), []
    return np.concatenate(blocks_tr, 1), np.concatenate(blocks_te, 1), names


def hashed_text(df: pd.DataFrame, field: str) -> sp.csr_matrix:
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(n_features=2**18, token_pattern=TOKEN_PATTERN, alternate_sign=False,
                            norm=None, binary=True)
    return vec.transform(df[field].fillna("").astype(str)).tocsr()


def lr_design(train: pd.DataFrame, test: pd.DataFrame, spec: Any) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    from sklearn.preprocessing import OneHotEncoder

    blocks_tr, blocks_te = [], []
    cats = spec.categorical
    if cats:
        ctr = np.stack([category_strings(train[f.name]) for f in cats], 1)
        cte = np.stack([category_strings(test[f.name]) for f in cats], 1)
        for j, f in enumerate(cats):
            enc = OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=f.min_count if f.min_count > 1 else None)
            blocks_tr.append(enc.fit_transform(ctr[:, [j]]))
            blocks_te.append(enc.transform(cte[:, [j]]))
    ntr, nte, _ = numeric_block(train, test, spec)
    itr, ite, _ = image_block(train, test, spec)
    if itr.shape[1]:
        mu, sd = np.nanmean(itr, 0), np.nanstd(itr, 0) + 1e-9
        itr, ite = np.nan_to_num((itr - mu) / sd), np.nan_to_num((ite - mu) / sd)
    for a, b in ((ntr, nte), (itr, ite)):
        if a.shape[1]:
            blocks_tr.append(sp.csr_matrix(a)), blocks_te.append(sp.csr_matrix(b))
    for f in spec.text:
        blocks_tr.append(hashed_text(train, f.name)), blocks_te.append(hashed_text(test, f.name))
    return sp.hstack(blocks_tr).tocsr(), sp.hstack(blocks_te).tocsr()


def hgb_design(train: pd.DataFrame, test: pd.DataFrame, spec: Any, seed: int,
               text_score: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, categorical mask) for HistGradientBoosting; `text_score` adds the stacked
    cross-fitted logistic text score to the hashed-text SVD components."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    cols_tr, cols_te, is_cat = [], [], []
    for f in spec.categorical:
        vtr, vte = category_strings(train[f.name]), category_strings(test[f.name])
        counts = pd.Series(vtr).value_counts()
        keep = counts[counts >= f.min_count].index[:HGB_MAX_CATEGORIES]
        lut = {v: i for i, v in enumerate(keep)}
        other = len(keep)
        cols_tr.append(np.array([lut.get(v, other) for v in vtr], float))
        cols_te.append(np.array([lut.get(v, other) for v in vte], float))
        is_cat.append(True)
    ntr, nte, _ = numeric_block(train, test, spec)
    itr, ite, _ = image_block(train, test, spec)
    for a, b in ((ntr, nte), (itr, ite)):
        for j in range(a.shape[1]):
            cols_tr.append(a[:, j]), cols_te.append(b[:, j]), is_cat.append(False)
    if spec.text:
        y, w = labels(train, spec)
        rows, lab, sw = expand(y, w)
        folds = np.random.default_rng(seed).integers(0, 2, len(train))
        for f in spec.text:
            xtr = normalize(hashed_text(train, f.name), norm="l1")
            xte = normalize(hashed_text(test, f.name), norm="l1")
            if text_score:
                score_tr = np.zeros(len(train))
                for k in (0, 1):  # cross-fitted: a row's text score never saw its own label
                    fit = folds[rows] != k
                    lr = LogisticRegression(C=1.0, max_iter=300).fit(xtr[rows[fit]], lab[fit], sample_weight=sw[fit])
                    score_tr[folds == k] = lr.decision_function(xtr[folds == k])
                lr = LogisticRegression(C=1.0, max_iter=300).fit(xtr[rows], lab, sample_weight=sw)
                cols_tr.append(score_tr), cols_te.append(lr.decision_function(xte)), is_cat.append(False)
            n_comp = int(min(8, xtr.shape[0] - 1, max(1, xtr.getnnz(axis=0).astype(bool).sum() - 1)))
            svd = TruncatedSVD(n_comp, random_state=seed).fit(xtr)
            for a, b in zip(svd.transform(xtr).T, svd.transform(xte).T):
                cols_tr.append(a), cols_te.append(b), is_cat.append(False)
    return np.stack(cols_tr, 1), np.stack(cols_te, 1), np.array(is_cat)


# ---- the three models ------------------------------------------------------------------------
def fit_lr(df: pd.DataFrame, split: dict[str, np.ndarray], spec: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    from within.calibration.metrics import logloss

    fit_rows = np.concatenate([split["train"], split["val"], split["calib"]])
    train, val, full, test = (df.iloc[split["train"]], df.iloc[split["val"]], df.iloc[fit_rows],
                              df.iloc[split["test"]])
    best_c, losses = LR_GRID[1], {}
    if len(val):
        if len(train) > LR_GRID_MAX_ROWS:  # pick C on a sample of the train rows; the refit uses all
            keep = np.random.default_rng(0).choice(len(train), LR_GRID_MAX_ROWS, replace=False)
            train = train.iloc[np.sort(keep)]
        xtr, xval = lr_design(train, val, spec)
        rows, lab, sw = expand(*labels(train, spec))
        yv, wv = labels(val, spec)
        for c in LR_GRID:
            m = LogisticRegression(C=c, max_iter=2000).fit(xtr[rows], lab, sample_weight=sw)
            losses[c] = logloss(m.predict_proba(xval)[:, 1], yv, weight=wv)
        best_c = min(losses, key=losses.get)
    xf, xte = lr_design(full, test, spec)
    rows, lab, sw = expand(*labels(full, spec))
    m = LogisticRegression(C=best_c, max_iter=2000).fit(xf[rows], lab, sample_weight=sw)
    return m.predict_proba(xte)[:, 1], {"C": best_c, "n_features": int(xf.shape[1])}


def fit_hgb(df: pd.DataFrame, split: dict[str, np.ndarray], spec: Any, seed: int,
            text_score: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    fit_rows = np.concatenate([split["train"], split["val"], split["calib"]])
    full, test = df.iloc[fit_rows], df.iloc[split["test"]]
    xf, xte, is_cat = hgb_design(full, test, spec, seed, text_score=text_score)
    rows, lab, sw = expand(*labels(full, spec))
    hgb = hgb_classifier(seed, categorical_features=is_cat if is_cat.any() else None)
    hgb.fit(xf[rows], lab, sample_weight=sw)
    return hgb.predict_proba(xte)[:, 1], {"n_iter": int(hgb.n_iter_), "n_features": int(xf.shape[1])}


def fit_within(df: pd.DataFrame, split: dict[str, np.ndarray], data: str, extra: list[str], seed: int,
               work: Path) -> tuple[np.ndarray, dict[str, Any]]:
    order = np.concatenate([split[s] for s in ("train", "val", "calib", "test")])
    source = df.iloc[order].reset_index(drop=True)
    n = len(source)
    # exact fractions: round(n * k / n) == k, and no time column (row order = our split order), so
    # within's split reproduces ours row for row
    run = train([
        f"data={data}", f"seed={seed}", "postfit=[calibrate,export]", "export.onnx=false",
        "data.split.method=time", f"data.split.val_frac={len(split['val']) / n!r}",
        f"++data.split.calib_frac={len(split['calib']) / n!r}", f"data.split.test_frac={len(split['test']) / n!r}",
        "++features.time=null", *extra,
    ], work / f"{data}_{seed}_{time.time_ns()}", source=source)
    best = run.model.metadata.get("best_checkpoint") or ""
    return np.asarray(run.model.predict(df.iloc[split["test"]]), dtype=np.float64), {
        "fit_s": run.seconds, "pipeline_test_auc": run.metrics.get("test/auc"), "best_checkpoint": Path(best).name or None,
    }


# ---- driver ----------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for model in MODELS:
        out[model] = {}
        for m in METRICS:
            vals = np.array([r[model][m] for r in runs if model in r], dtype=float)
            if len(vals):
                out[model][f"{m}_mean"] = float(np.mean(vals))
                out[model][f"{m}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    return out


def acceptance(name: str, summary: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    w, lr, hgb = (summary[m].get("auc_mean") for m in ("within", "lr", "hgb"))
    if None in (w, lr, hgb):
        return None
    if name == "ipinyou":
        lr_sd = summary["lr"].get("auc_sd")
        lr_sd = 0.0 if lr_sd is None or np.isnan(lr_sd) else lr_sd
        return {"rule": "within AUC >= LR AUC - 1 sd and >= HGB AUC",
                "within_minus_lr": w - lr, "lr_sd": lr_sd, "within_minus_hgb": w - hgb,
                "met": bool(w >= lr - lr_sd and w >= hgb)}
    if name == "simulator":
        hashed = summary.get("hgb_hashed", {}).get("auc_mean")
        if hashed is None:
            return None
        out = {"rule": "within AUC >= HGB (hashed text + image summaries) AUC + 0.01",
               "within_minus_hgb": w - hashed, "within_minus_hgb_stacked": w - hgb, "met": bool(w >= hashed + 0.01),
               "met_against_stacked_hgb": bool(w >= hgb + 0.01)}
        ens = summary.get("within_ens", {}).get("auc_mean")
        if ens is not None:  # the framework's own model=ensemble, reported beside the single nn
            out.update({"ensemble_minus_hgb": ens - hashed, "ensemble_minus_hgb_stacked": ens - hgb,
                        "met_by_ensemble": bool(ens >= hashed + 0.01),
                        "met_by_ensemble_against_stacked_hgb": bool(ens >= hgb + 0.01)})
        return out
    return None


def run_dataset(name: str, n_runs: int, quick: bool, work: Path, sim_rows: int | None, sim_world: int | None,
                done: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """All runs of one dataset; `done` (runs already in the JSON, same settings) are kept, not rerun."""
    info = DATASETS[name]
    extra: list[str] = []
    if name == "simulator" and sim_rows:
        extra.append(f"data.source.n={sim_rows}")
    if name == "simulator" and sim_world is not None:  # another world: a check on rows no choice was made on
        extra.append(f"data.source.seed={sim_world}")
    if quick:
        extra.append("trainer.max_epochs=2")
    t0 = time.perf_counter()
    df, spec, fracs, method = load_dataset(info["data"], extra)
    splits = make_splits(df, spec, fracs, method, info["protocol"], n_runs)
    runs = list(done or [])[:len(splits)]
    models = [m for m in MODELS if (m != "hgb_hashed" or spec.text)  # without text it IS hgb
              and (m != "within_ens" or name in ENSEMBLE_DATASETS)]
    for i, split in enumerate(splits):
        seed = i  # kfold: fold i uses seed i; seeds: seed i
        if i < len(runs):  # a stored run: only the models it lacks (a baseline added later)
            r = runs[i]
        else:
            r = {"run": i, "seed": seed, "n_test": len(split["test"]),
                 "n_fit": int(sum(len(split[s]) for s in ("train", "val", "calib")))}
            runs.append(r)
        test = df.iloc[split["test"]]
        for model in models:
            if model in r:
                continue
            t1 = time.perf_counter()
            if model in ("within", "within_ens"):
                more = ENSEMBLE_OVERRIDES if model == "within_ens" else []
                p, extra_info = fit_within(df, split, info["data"], extra + more, seed, work)
            elif model == "lr":
                p, extra_info = fit_lr(df, split, spec)
            else:
                p, extra_info = fit_hgb(df, split, spec, seed, text_score=model == "hgb")
            r[model] = {**score(p, test, spec), "wall_s": time.perf_counter() - t1, **extra_info}
            print(f"[{name}] run {i} {model}: auc={r[model]['auc']:.4f} logloss={r[model]['logloss']:.5f} "
                  f"calib={r[model]['calib_ratio']:.3f} ({r[model]['wall_s']:.0f}s)", flush=True)
    y, w = labels(df, spec)
    summary = summarise(runs)
    return {
        "data_config": info["data"], "overrides": extra, "protocol": info["protocol"],
        "n_runs": len(runs), "rows": len(df),
        "impressions": float(w.sum()) if w is not None else len(df),
        "ctr": float(y.sum() / (w.sum() if w is not None else len(y))), "weighted": bool(spec.weight),
        "split": {"method": "5 random folds (permutation seed 0)" if info["protocol"] == "kfold" else method,
                  **{f"{k}_frac": v for k, v in fracs.items()}},
        "summary": summary, "acceptance": acceptance(name, summary), "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }


def fmt(mean: float | None, sd: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    if sd is None or np.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| dataset | rows | protocol | model | AUC | logloss | calib ratio (Σp/Σy) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for name, d in result["datasets"].items():
        proto = f"{d['n_runs']} folds" if d["protocol"] == "kfold" else f"{d['n_runs']} seed{'s' if d['n_runs'] > 1 else ''}, {d['split']['method']} split"
        for model in MODELS:
            s = d["summary"].get(model, {})
            if not s:
                continue
            label = {"within": "within (nn)", "within_ens": "within (model=ensemble: nn, nn + cross layer, regularised nn)",
                     "lr": "LogisticRegression",
                     "hgb": "HistGradientBoosting" + (" (+ stacked text LR score)" if "hgb_hashed" in d["summary"] and d["summary"]["hgb_hashed"] else ""),
                     "hgb_hashed": "HistGradientBoosting (hashed text + image summaries)"}[model]
            lines.append(
                f"| {name if model == 'within' else ''} | {d['rows'] if model == 'within' else ''} | "
                f"{proto if model == 'within' else ''} | {label} | {fmt(s.get('auc_mean'), s.get('auc_sd'), 4)} | "
                f"{fmt(s.get('logloss_mean'), s.get('logloss_sd'), 4)} | "
                f"{fmt(s.get('calib_ratio_mean'), s.get('calib_ratio_sd'), 3)} |")
        acc = d.get("acceptance")
        if acc:
            notes.append(f"- {name}: {acc['rule']}: **{'met' if acc['met'] else 'NOT met'}** "
                         f"(within - HGB = {acc['within_minus_hgb']:+.4f}"
                         + (f", within - LR = {acc['within_minus_lr']:+.4f}, LR sd = {acc['lr_sd']:.4f}"
                            if "within_minus_lr" in acc else "")
                         + (f"; against the stronger stacked HGB: {acc['within_minus_hgb_stacked']:+.4f}, "
                            f"{'met' if acc['met_against_stacked_hgb'] else 'NOT met'}"
                            if "within_minus_hgb_stacked" in acc else "") + ")")
            if "ensemble_minus_hgb" in acc:
                notes.append(f"- {name}: the same rule for within model=ensemble (3 members: nn, nn + DCN-v2 cross "
                             "layer, nn with weight decay 0.05 and dropout 0.2): "
                             f"**{'met' if acc['met_by_ensemble'] else 'NOT met'}** "
                             f"(ensemble - HGB = {acc['ensemble_minus_hgb']:+.4f}; against the stacked HGB: "
                             f"{acc['ensemble_minus_hgb_stacked']:+.4f}, "
                             f"{'met' if acc['met_by_ensemble_against_stacked_hgb'] else 'NOT met'})")
        if d.get("weighted"):
            notes.append(f"- {name}: aggregated rows; fitting and metrics weighted by impressions.")
        if d["protocol"] == "seeds" and d["n_runs"] < 3:
            notes.append(f"- {name}: {d['n_runs']} seed{'s' if d['n_runs'] > 1 else ''} only (one within run on "
                         f"{d['rows']:,} rows takes 3-8 min on this shared 2-core CPU).")
        elif d.get("note"):
            notes.append(f"- {name}: {d['note']}.")
    head = ("Test metrics, mean ± sd over folds / seeds (`benchmarks/real_data.py`, CPU). Same rows, split and "
            "features for all three; LR and HGB train on within's train + val + calib rows. Folds: 5 random "
            "folds; seeds: the data config's split, seeds 0-2 vary the model init (LR is deterministic, sd 0).")
    return "\n".join([head, ""] + lines + ([""] + notes if notes else [])) + "\n"


def result_name(quick: bool, sim_world: int | None) -> str:
    """real_data, real_data_quick, real_data_world<W> (another simulator world): one JSON per setting."""
    return "real_data" + ("_quick" if quick else "") + ("" if sim_world is None else f"_world{sim_world}")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {list(DATASETS)}")
    ap.add_argument("--quick", action="store_true", help="2 folds/seeds, 2 epochs, 50k simulator rows")
    ap.add_argument("--seeds", type=int, default=3, help="runs for the 'seeds' protocol (real data)")
    ap.add_argument("--folds", type=int, default=5, help="folds run for the 'kfold' protocol (of 5)")
    ap.add_argument("--sim-seeds", type=int, default=1, help="runs on the simulator (~3 min of within each)")
    ap.add_argument("--sim-rows", type=int, default=None, help="simulator rows (default: the data config's)")
    ap.add_argument("--sim-world", type=int, default=None,
                    help="simulator world seed (default: the data config's, 7); writes real_data_world<W>")
    ap.add_argument("--force", action="store_true", help="rerun datasets already in the JSON")
    ap.add_argument("--extend", action="store_true",
                    help="for datasets in the JSON, run only the folds / seeds it lacks (e.g. --sim-seeds 2)")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON")
    args = ap.parse_args()
    name = result_name(args.quick, args.sim_world)
    result: dict[str, Any] = read_json(name, args.results_dir) or {}
    if args.table and not result:
        raise SystemExit(f"--table: no {name}.json in {args.results_dir}; run the benchmark first")
    if not args.table:
        names = [s.strip() for s in args.datasets.split(",") if s.strip()]
        unknown = sorted(set(names) - set(DATASETS))
        if unknown:
            raise SystemExit(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
        result.setdefault("datasets", {})
        result.update({"machine": machine(), "data_dir": str(DATA_DIR), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
        sim_rows = args.sim_rows or (50_000 if args.quick else None)
        with tempfile.TemporaryDirectory() as tmp:
            for dataset in names:
                done = None
                if dataset in result["datasets"] and args.extend and not args.force:
                    done = result["datasets"][dataset]["runs"]
                elif dataset in result["datasets"] and not args.force:
                    print(f"[{dataset}] already in {name}.json; skipped (--force reruns)", flush=True)
                    continue
                folder = DATASETS[dataset]["folder"]
                if folder and not (DATA_DIR / folder).exists():
                    print(f"[{dataset}] {DATA_DIR / folder} absent; skipped", flush=True)
                    continue
                proto = DATASETS[dataset]["protocol"]
                n_runs = (2 if args.quick else args.folds) if proto == "kfold" else (
                    args.sim_seeds if dataset == "simulator" else (2 if args.quick else args.seeds))
                result["datasets"][dataset] = run_dataset(dataset, n_runs, args.quick, Path(tmp), sim_rows,
                                                          args.sim_world, done)
                if dataset == "simulator" and n_runs == 1:
                    result["datasets"][dataset]["note"] = ("one seed only (one within run on 800k rows takes minutes "
                                                           "on this 2-core CPU); no sd")
                write_json(name, result, args.results_dir)  # after each dataset: resumable
    write_markdown(name, markdown(result), args.results_dir)
    print(markdown(result))


if __name__ == "__main__":
    main()
