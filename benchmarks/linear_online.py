"""Online sparse logistic regression: DynamicLinear (FTRL-Proximal) vs sklearn.

Three sections, all written to benchmarks/results/linear_online.json:

* ``stream``: hashed tabular rows with a known logistic truth over 12 categorical fields, plus as
  many irrelevant categorical fields and two numerics, hashed into 2**18 columns by
  HashingFeaturizer. Both online learners see the same CSR minibatches in the same order.
* ``simulator``: the default simulator world (conf/data/synthetic.yaml), its tabular fields
  (numeric, categorical and group keys; no text, no image) hashed the way ``model=linear`` does,
  time split; DynamicLinear one pass vs SGDClassifier.partial_fit vs batch LogisticRegression.
* ``irrelevant_world``: 8 relevant fields and 40 irrelevant ones (83% of the hashed weights
  carry no signal): how much ``sparsify()`` removes and what it costs in AUC.

Run: python benchmarks/linear_online.py [--sections stream,simulator,irrelevant_world]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import roc_auc_score

from within.models.linear import DynamicLinear, HashingFeaturizer

SEED, N_TRAIN, N_TEST, BATCH = 0, 200_000, 50_000, 1000
# simulator rows arrive in time order, so a batch shares its hour and day; smaller FTRL steps track
# that (measured at 400k rows: batch 1000 -> AUC 0.701, 250 -> 0.711, batch LR 0.710)
SIM_BATCH = 256
RELEVANT, IRRELEVANT, CARD = 12, 12, 400
D = 2**18
OUT = Path(__file__).parent / "results" / "linear_online.json"


def make_stream(n: int, rng: np.random.Generator, relevant: int = RELEVANT,
                irrelevant: int = IRRELEVANT) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    effects = np.random.default_rng(123).normal(0.0, 0.5, (relevant, CARD))
    codes = rng.integers(0, CARD, (n, relevant + irrelevant))
    bid = rng.lognormal(0.0, 1.0, n)
    age = rng.normal(0.0, 1.0, n)
    logit = -2.0 + effects[np.arange(relevant), codes[:, :relevant]].sum(1) + 0.4 * np.log1p(bid) - 0.3 * age
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    df = pd.DataFrame({f"c{j}": codes[:, j] for j in range(codes.shape[1])})
    df["bid"], df["age"] = bid, age
    return df, y, logit


def best_rate(fn, n_rows: int, repeats: int = 3) -> float:
    """Rows/s of the fastest of `repeats` runs (the machine is shared; the best run is the least disturbed)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_rows / min(times)


def stream_section() -> dict:
    rng = np.random.default_rng(SEED)
    df, y, logit = make_stream(N_TRAIN + N_TEST, rng)
    feat = HashingFeaturizer(categorical=[c for c in df if c.startswith("c")], numeric=["bid", "age"], n_features=D)
    t0 = time.perf_counter()
    feat.fit(df.iloc[:N_TRAIN])
    X = feat.transform(df)
    hash_rate = len(df) / (time.perf_counter() - t0)
    Xtr, ytr, Xte, yte = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    batches = [(Xtr[i : i + BATCH], ytr[i : i + BATCH]) for i in range(0, N_TRAIN, BATCH)]

    def run_ftrl(**kw) -> DynamicLinear:
        m = DynamicLinear(n_features=D, batch_size=BATCH, **kw)
        for xb, yb in batches:
            m.fit_incremental(xb, yb)
        return m

    def run_sgd(**kw) -> SGDClassifier:
        m = SGDClassifier(loss="log_loss", random_state=SEED, **kw)
        for xb, yb in batches:
            m.partial_fit(xb, yb, classes=[0.0, 1.0])
        return m

    # settings picked on the last 10% of the train stream (progressive validation), never on test.
    params, grid = pick_params(Xtr, ytr, n_features=D, batch_size=BATCH)
    sgd_kw, sgd_grid = pick_sgd(Xtr, ytr)

    ftrl_default = run_ftrl()
    ftrl = run_ftrl(**params)
    sgd = run_sgd(**sgd_kw)
    sgd_default = run_sgd()
    result = {
        "setup": {
            "n_train": N_TRAIN, "n_test": N_TEST, "batch_rows": BATCH, "n_features": D,
            "relevant_fields": RELEVANT, "irrelevant_fields": IRRELEVANT, "cardinality": CARD,
            "nnz_per_row": X.nnz / X.shape[0], "machine": platform.processor() or platform.machine(),
        },
        "featurizer_rows_per_s": hash_rate,
        "ftrl_grid_val_auc": grid,
        "ftrl_chosen": params,
        "sgd_grid_val_auc": sgd_grid,
        "sgd_chosen": sgd_kw,
        "ftrl_rows_per_s": best_rate(lambda: run_ftrl(**params), N_TRAIN),
        "sgd_rows_per_s": best_rate(lambda: run_sgd(**sgd_kw), N_TRAIN),
        "sgd_default_rows_per_s": best_rate(run_sgd, N_TRAIN, repeats=1),
        "test_auc": {
            "oracle_true_logit": roc_auc_score(yte, logit[N_TRAIN:]),
            "ftrl_default_settings_1pass": roc_auc_score(yte, ftrl_default.predict(Xte)),
            "ftrl_1pass": roc_auc_score(yte, ftrl.predict(Xte)),
            "sgd_partial_fit_1pass": roc_auc_score(yte, sgd.decision_function(Xte)),
            "sgd_default_1pass": roc_auc_score(yte, sgd_default.decision_function(Xte)),
        },
    }
    t0 = time.perf_counter()
    lr = LogisticRegression(max_iter=300).fit(Xtr, ytr)
    result["logreg_fit_s"] = time.perf_counter() - t0
    result["test_auc"]["logreg_batch"] = roc_auc_score(yte, lr.decision_function(Xte))
    two = DynamicLinear(n_features=D, batch_size=BATCH, epochs=2, **params).fit(Xtr, ytr)
    result["test_auc"]["ftrl_2pass"] = roc_auc_score(yte, two.predict(Xte))

    before = result["test_auc"]["ftrl_1pass"]
    result["ftrl_vs_sgd_speed_ratio"] = result["ftrl_rows_per_s"] / result["sgd_rows_per_s"]
    result["ftrl_minus_logreg_auc"] = before - result["test_auc"]["logreg_batch"]
    return result


def pick_params(X, y, alphas=(0.03, 0.1, 0.3), penalties=(0.1, 1.0), **kw) -> tuple[dict, dict]:
    """FTRL alpha and l1 = l2 by validation on the last 10% of the training stream (never test)."""
    n_fit = int(0.9 * X.shape[0])
    grid = {}
    for a in alphas:
        for pen in penalties:
            m = DynamicLinear(alpha=a, l1=pen, l2=pen, **kw).fit_incremental(X[:n_fit], y[:n_fit])
            grid[f"alpha={a},l1=l2={pen}"] = ({"alpha": a, "l1": pen, "l2": pen},
                                              roc_auc_score(y[n_fit:], m.predict(X[n_fit:])))
    best = max(grid, key=lambda k: grid[k][1])
    return grid[best][0], {k: v[1] for k, v in grid.items()}


def pick_sgd(X, y, batch: int = BATCH) -> tuple[dict, dict]:
    """SGDClassifier gets the same chance: sklearn defaults and constant step sizes, chosen the same way."""
    n_fit = int(0.9 * X.shape[0])
    grid = {}
    for name, kw in {"default": {}, **{f"constant_{e}": {"alpha": 1e-6, "learning_rate": "constant", "eta0": e}
                                        for e in (0.003, 0.01, 0.05)}}.items():
        m = SGDClassifier(loss="log_loss", random_state=SEED, **kw)
        for i in range(0, n_fit, batch):
            m.partial_fit(X[i : min(i + batch, n_fit)], y[i : min(i + batch, n_fit)], classes=[0.0, 1.0])
        grid[name] = (kw, roc_auc_score(y[n_fit:], m.decision_function(X[n_fit:])))
    best = max(grid, key=lambda k: grid[k][1])
    return grid[best][0], {k: v[1] for k, v in grid.items()}


def simulator_section(n: int, seed: int = 7) -> dict:
    """DynamicLinear on the simulator's tabular features, as `model=linear` hashes them."""
    import yaml

    from within.data.simulator import simulate
    from within.features.spec import FeatureSpec
    from within.pipeline.linear import featurizer_for

    root = Path(__file__).resolve().parents[1]
    spec = FeatureSpec.from_config(yaml.safe_load((root / "conf/features/synthetic.yaml").read_text()))
    df = simulate(n=n, seed=seed).sort_values(spec.time, kind="stable").reset_index(drop=True)
    n_tr = int(0.8 * n)  # time split: the last 20% of the timeline is test
    feat = featurizer_for(spec, D, text=False).fit(df.iloc[:n_tr])
    X = feat.transform(df)
    y = df[spec.label].to_numpy(np.float64)
    Xtr, ytr, Xte, yte = X[:n_tr], y[:n_tr], X[n_tr:], y[n_tr:]
    batches = [(Xtr[i : i + SIM_BATCH], ytr[i : i + SIM_BATCH]) for i in range(0, n_tr, SIM_BATCH)]
    params, grid = pick_params(Xtr, ytr, n_features=D, batch_size=SIM_BATCH)
    sgd_kw, sgd_grid = pick_sgd(Xtr, ytr, SIM_BATCH)

    def run_ftrl() -> DynamicLinear:
        m = DynamicLinear(n_features=D, batch_size=SIM_BATCH, **params)
        for xb, yb in batches:
            m.fit_incremental(xb, yb)
        return m

    def run_sgd() -> SGDClassifier:
        m = SGDClassifier(loss="log_loss", random_state=SEED, **sgd_kw)
        for xb, yb in batches:
            m.partial_fit(xb, yb, classes=[0.0, 1.0])
        return m

    ftrl, sgd = run_ftrl(), run_sgd()
    t0 = time.perf_counter()
    lr = LogisticRegression(max_iter=500).fit(Xtr, ytr)
    lr_s = time.perf_counter() - t0
    auc = {
        "oracle_true_ctr": roc_auc_score(yte, df[spec.truth].to_numpy()[n_tr:]),
        "ftrl_1pass": roc_auc_score(yte, ftrl.predict(Xte)),
        "sgd_partial_fit_1pass": roc_auc_score(yte, sgd.decision_function(Xte)),
        "logreg_batch": roc_auc_score(yte, lr.decision_function(Xte)),
    }
    ftrl_rate = best_rate(run_ftrl, n_tr)
    sgd_rate = best_rate(run_sgd, n_tr)
    gap = auc["ftrl_1pass"] - auc["logreg_batch"]
    return {
        "rows": n, "train_rows": n_tr, "seed": seed, "fields": feat.categorical + feat.numeric,
        "nnz_per_row": X.nnz / X.shape[0], "batch_rows": SIM_BATCH, "order": "time (as an online learner would see it)",
        "ftrl_grid_val_auc": grid, "ftrl_chosen": params, "sgd_grid_val_auc": sgd_grid, "sgd_chosen": sgd_kw, "test_auc": auc, "logreg_fit_s": lr_s,
        "ftrl_rows_per_s": ftrl_rate, "sgd_rows_per_s": sgd_rate,
        "ftrl_vs_sgd_speed_ratio": ftrl_rate / sgd_rate,
        "ftrl_minus_logreg_auc": gap,
        "accept_within_0.005_of_logreg": bool(gap >= -0.005),
        "accept_at_least_sgd_rows_per_s": bool(ftrl_rate >= sgd_rate),
    }


def irrelevant_world_section(relevant: int = 8, irrelevant: int = 40) -> dict:
    """sparsify() on a world where most hashed weights carry no signal."""
    rng = np.random.default_rng(SEED + 1)
    df, y, logit = make_stream(N_TRAIN + N_TEST, rng, relevant, irrelevant)
    feat = HashingFeaturizer(categorical=[c for c in df if c.startswith("c")], numeric=["bid", "age"], n_features=D)
    X = feat.fit(df.iloc[:N_TRAIN]).transform(df)
    Xtr, ytr, Xte, yte = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    params, grid = pick_params(Xtr, ytr, n_features=D, batch_size=BATCH)
    base = DynamicLinear(n_features=D, batch_size=BATCH, **params).fit_incremental(Xtr, ytr)
    before = roc_auc_score(yte, base.predict(Xte))
    nonzero = int(np.count_nonzero(base.get_coefficients()))
    out = {"relevant_fields": relevant, "irrelevant_fields": irrelevant, "ftrl_chosen": params,
           "ftrl_grid_val_auc": grid, "oracle_auc": roc_auc_score(yte, logit[N_TRAIN:]),
           "auc_before": before, "nonzero_weights": nonzero, "thresholds": {}}
    for thr in (0.02, 0.05, 0.1, 0.2):
        m = copy.deepcopy(base)
        removed = m.sparsify(thr)
        change = roc_auc_score(yte, m.predict(Xte)) - before
        out["thresholds"][str(thr)] = {"removed_fraction_of_nonzero": removed / max(nonzero, 1), "auc_change": change,
                                      "accept_removes_50pct_costs_lt_0.002": bool(removed / max(nonzero, 1) >= 0.5
                                                                                 and change > -0.002)}
    out["accept_any_threshold"] = any(v["accept_removes_50pct_costs_lt_0.002"] for v in out["thresholds"].values())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="stream,simulator,irrelevant_world")
    ap.add_argument("--simulator-rows", type=int, default=800_000)  # the default world
    args = ap.parse_args(argv)
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result = result if "stream" in result else {}  # older flat layout: start over
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        if name == "stream":
            result[name] = stream_section()
        elif name == "simulator":
            result[name] = simulator_section(args.simulator_rows)
        elif name == "irrelevant_world":
            result[name] = irrelevant_world_section()
        else:
            raise SystemExit(f"--sections: unknown section {name!r}; choose from stream, simulator, irrelevant_world")
        result[name]["seconds"] = time.perf_counter() - t0
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
