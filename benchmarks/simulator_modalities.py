"""Does every modality of the simulator matter? AUC of gradient boosting with and without text/image.

Trains sklearn HistGradientBoostingClassifier on the early rows (time split) of
``AdMarketSimulator(seed).sample(n)`` and scores the later rows:

* ``tabular``: numeric + categorical fields only (categoricals as codes; ad_id / ad_group_id left out);
* ``tabular+text``: plus a text score (logistic regression on l1-normalised bag-of-words per field,
  cross-fitted on the training rows) and 8 TruncatedSVD components of the word counts;
* ``tabular+image``: plus image summaries (per-channel mean/std, luminance std);
* ``all``: tabular + text + image;
* ``oracle``: ``true_ctr`` itself.

Boosting with generic features is a weak learner here, so a second block fits a well-specified L2
logistic regression (one-hot ids and fields, device x placement, l1-normalised bag of words per
field and age x words, image statistics with brightness^2 and warmth x placement): a reference for
what a model of the right form (e.g. the NN: embeddings + mean-pooled text + CNN) can learn from
the same rows, with and without each modality.

Also records sampling speed and the peak memory of streaming ``--stream-rows`` rows.

    python -m benchmarks.simulator_modalities            # 300k rows -> benchmarks/results/simulator_modalities.json
    python -m benchmarks.simulator_modalities --rows 6000 --stream-rows 20000 --results-dir /tmp/sm   # a trial run
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder, normalize

from benchmarks.common import IMAGE_SUMMARIES, hgb_classifier, image_summaries, machine, parser, write_json
from within.data.simulator import AdMarketSimulator, image_stats

NAME = "simulator_modalities"

CATEGORICAL = ["placement", "device", "age_band", "gender", "hour", "day_of_week", "country", "state",
               "city", "account_id", "campaign_id"]
NUMERIC = ["budget", "bid", "latitude", "longitude", "population_density"]
TEXT = ["headline", "description"]


def tabular_features(df: pd.DataFrame) -> pd.DataFrame:
    out = df[NUMERIC].astype(np.float64).copy()
    for c in CATEGORICAL:
        out[c] = pd.Categorical(df[c].astype(str))
    return out


def image_features(df: pd.DataFrame) -> pd.DataFrame:
    """Per-channel mean / std and luminance std of main_image (benchmarks.common.image_summaries)."""
    feats = image_summaries(df["main_image"].to_numpy(dtype=object))
    return pd.DataFrame(feats, columns=[f"img_{s}" for s in IMAGE_SUMMARIES], index=df.index)


def text_features(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-fitted logistic-regression text score + SVD components, per text field."""
    tr_out, te_out = pd.DataFrame(index=train.index), pd.DataFrame(index=test.index)
    folds = np.random.default_rng(seed).integers(0, 2, len(train))
    y = train["clicked"].to_numpy()
    for field in TEXT:
        vec = CountVectorizer(token_pattern=r"\S+").fit(train[field].astype(str))
        xtr = normalize(vec.transform(train[field].astype(str)), norm="l1")
        xte = normalize(vec.transform(test[field].astype(str)), norm="l1")
        score_tr = np.empty(len(train))
        for f in (0, 1):
            lr = LogisticRegression(C=1.0, max_iter=300).fit(xtr[folds != f], y[folds != f])
            score_tr[folds == f] = lr.decision_function(xtr[folds == f])
        lr = LogisticRegression(C=1.0, max_iter=300).fit(xtr, y)
        tr_out[f"{field}_lr"], te_out[f"{field}_lr"] = score_tr, lr.decision_function(xte)
        svd = TruncatedSVD(8, random_state=seed).fit(xtr)
        for j, (a, b) in enumerate(zip(svd.transform(xtr).T, svd.transform(xte).T)):
            tr_out[f"{field}_svd{j}"], te_out[f"{field}_svd{j}"] = a, b
    return tr_out, te_out


def fit_auc(xtr: pd.DataFrame, ytr: np.ndarray, xte: pd.DataFrame, yte: np.ndarray, seed: int,
            max_iter: int = 300) -> float:
    hgb = hgb_classifier(seed, categorical_features="from_dtype", max_iter=max_iter)
    hgb.fit(xtr, ytr)
    return float(roc_auc_score(yte, hgb.predict_proba(xte)[:, 1]))


def modality_aucs(df: pd.DataFrame, seed: int = 0, with_modalities: bool = True,
                  max_iter: int = 300) -> dict[str, float]:
    """AUCs on the last third of ``df`` (time order) for models trained on the first two thirds."""
    cut = int(len(df) * 2 / 3)
    train, test = df.iloc[:cut], df.iloc[cut:]
    ytr, yte = train["clicked"].to_numpy(), test["clicked"].to_numpy()
    tab_tr, tab_te = tabular_features(train), tabular_features(test)
    out = {"oracle": float(roc_auc_score(yte, test["true_ctr"])),
           "tabular": fit_auc(tab_tr, ytr, tab_te, yte, seed, max_iter)}
    if with_modalities:
        txt_tr, txt_te = text_features(train, test, seed)
        img_tr, img_te = image_features(train), image_features(test)
        out["tabular+text"] = fit_auc(pd.concat([tab_tr, txt_tr], axis=1), ytr,
                                      pd.concat([tab_te, txt_te], axis=1), yte, seed, max_iter)
        out["tabular+image"] = fit_auc(pd.concat([tab_tr, img_tr], axis=1), ytr,
                                       pd.concat([tab_te, img_te], axis=1), yte, seed, max_iter)
        out["all"] = fit_auc(pd.concat([tab_tr, txt_tr, img_tr], axis=1), ytr,
                             pd.concat([tab_te, txt_te, img_te], axis=1), yte, seed, max_iter)
    return out


def glm_aucs(df: pd.DataFrame, C: float = 0.05) -> dict[str, float]:
    """Well-specified logistic regression on the first two thirds, AUC on the rest, per modality set."""
    cut = int(len(df) * 2 / 3)
    y = df["clicked"].to_numpy()
    cats = df[CATEGORICAL].astype(str)
    cats["device_x_placement"] = cats["device"] + "|" + cats["placement"]
    x_cat = OneHotEncoder(handle_unknown="ignore").fit(cats.iloc[:cut]).transform(cats)
    age = OneHotEncoder().fit_transform(cats[["age_band"]]).tocsc()
    place = OneHotEncoder().fit_transform(cats[["placement"]]).tocsc()
    words = sp.hstack([normalize(CountVectorizer(token_pattern=r"\S+").fit(df[f].iloc[:cut].astype(str))
                                 .transform(df[f].astype(str)), norm="l1") for f in TEXT]).tocsr()
    text = sp.hstack([words] + [words.multiply(age[:, j]) for j in range(age.shape[1])])
    obj = df["main_image"].to_numpy(dtype=object)
    _, first, inv = np.unique(np.fromiter((id(x) for x in obj), np.int64, len(obj)),
                              return_index=True, return_inverse=True)
    warmth, bright, sal = (v[inv.reshape(-1)] for v in image_stats(np.stack([obj[i] for i in first])))
    img = np.stack([warmth, bright, (bright - 0.5) ** 2, sal], axis=1)
    img = sp.hstack([sp.csr_matrix((img - img[:cut].mean(0)) / img[:cut].std(0)),
                     place.multiply(warmth[:, None] / warmth[:cut].std())])
    num = np.log(df[["bid", "budget", "population_density"]].to_numpy(np.float64))
    tab = sp.hstack([x_cat, sp.csr_matrix((num - num[:cut].mean(0)) / num[:cut].std(0))])
    out = {}
    for name, blocks in {"tabular": [tab], "tabular+text": [tab, text], "tabular+image": [tab, img],
                         "all": [tab, text, img]}.items():
        x = sp.hstack(blocks).tocsr()
        lr = LogisticRegression(C=C, max_iter=1000).fit(x[:cut], y[:cut])
        out[name] = float(roc_auc_score(y[cut:], lr.decision_function(x[cut:])))
    return out


def stream_peak_mib(sim: AdMarketSimulator, n: int, chunk_size: int = 100_000) -> tuple[float, float]:
    """Peak traced Python memory (MiB) while streaming n rows, and the rows/s achieved."""
    tracemalloc.start()
    t0, rows = time.perf_counter(), 0
    for chunk in sim.iter_chunks(n, chunk_size):
        rows += len(chunk)
        del chunk
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert rows == n
    return peak, n / dt


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--stream-rows", type=int, default=10_000_000, help="0 skips the streaming check")
    args = ap.parse_args()

    t0 = time.perf_counter()
    sim = AdMarketSimulator(seed=args.seed)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = sim.sample(args.rows)
    sample_s = time.perf_counter() - t0
    summary = sim.world_summary()
    result = {
        "rows": args.rows, "seed": args.seed, "machine": machine(),
        "mean_true_ctr": float(df["true_ctr"].mean()), "mean_clicked": float(df["clicked"].mean()),
        "build_s": build_s, "sample_rows_per_s": args.rows / sample_s,
        "sizes": summary["sizes"], "logit_sd": summary["logit_sd"],
        "auc": modality_aucs(df, seed=args.seed),
    }
    result["oracle_minus_tabular"] = result["auc"]["oracle"] - result["auc"]["tabular"]
    result["auc_logistic"] = glm_aucs(df)
    result["oracle_minus_logistic_all"] = result["auc"]["oracle"] - result["auc_logistic"]["all"]
    if args.stream_rows:
        del df
        peak, rate = stream_peak_mib(sim, args.stream_rows)
        result["stream"] = {"rows": args.stream_rows, "chunk_size": 100_000, "peak_traced_mib": peak,
                            "rows_per_s": rate}
    print(result)
    print(f"wrote {write_json(NAME, result, args.results_dir)}")


if __name__ == "__main__":
    main()
