"""model=linear: DynamicLinear (FTRL-Proximal over hashed features) on the same splits as model=nn.

The train split is streamed in chunks through `fit_incremental`, `linear.epochs` passes, val scored
after each pass. No Lightning trainer: trainer.* does not apply. The post-fit steps that need a
network (quantize, ONNX export) skip themselves; calibrate and intervals work as for networks.

`update_bundle(bundle, frame)` continues training a saved bundle on new labelled rows:
    python -m within.pipeline.recipes.linear BUNDLE NEW_ROWS.{csv,parquet} [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig
from scipy.special import expit

from within.features.spec import FeatureSpec
from within.models.base import BaseMLModel, BundleError
from within.models.linear import DynamicLinear, HashingFeaturizer
from within.pipeline.config import ConfigError
from within.pipeline.privacy import privacy_enabled
from within.pipeline.recipe import FitResult, TrainRun
from within.pipeline.report import score_frame

log = logging.getLogger(__name__)
FEATURIZER_KEYS = ("numeric_transform", "text")


def featurizer_for(spec: FeatureSpec, n_features: int, numeric_transform: str = "signed_log1p",
                   text: bool = True) -> HashingFeaturizer:
    """Hash categorical and group fields, scale numerics, bag-of-words text; images are not used."""
    return HashingFeaturizer(
        categorical=[f.name for f in spec.of_type("categorical", "group")],
        numeric=[f.name for f in spec.numeric],
        n_features=n_features,
        numeric_transform=numeric_transform,
        text=[f.name for f in spec.text] if text else [],
    )


def targets(spec: FeatureSpec, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """(y in [0, 1], sample weight): aggregated rows (spec.weight) become CTR weighted by impressions."""
    y = frame[spec.label].to_numpy(dtype=np.float64)
    if not spec.weight:
        return y, None
    w = frame[spec.weight].to_numpy(dtype=np.float64)
    return np.divide(y, w, out=np.zeros_like(y), where=w > 0), w


def stream_pass(model: DynamicLinear, spec: FeatureSpec, frame: pd.DataFrame, chunk_rows: int,
                score: bool = True) -> float:
    """One in-order pass over `frame`; returns the progressive-validation log loss (each minibatch
    scored before the model trains on it, the usual online training loss). `score=False` on later
    passes: rows already seen must not count again in `alpha="auto"`'s progressive loss."""
    total, weight = 0.0, 0.0
    for start in range(0, len(frame), chunk_rows):
        chunk = frame.iloc[start : start + chunk_rows]
        X = model.featurizer.transform(chunk)
        y, sw = targets(spec, chunk)
        w = np.ones_like(y) if sw is None else sw
        for b in range(0, len(y), model.batch_size):
            sl = slice(b, b + model.batch_size)
            p = np.clip(expit(model.decision_function(X[sl])), 1e-12, 1 - 1e-12)
            total += float(-(w[sl] * (y[sl] * np.log(p) + (1 - y[sl]) * np.log1p(-p))).sum())
            weight += float(w[sl].sum())
            model.fit_incremental(X[sl], y[sl], None if sw is None else sw[sl], score=score)
    return total / max(weight, 1e-12)


class LinearRecipe:
    """Recipe for model=linear. Args are the `model:` node: the DynamicLinear settings (`linear`),
    the featurizer options (`featurizer`: numeric_transform, text) and `chunk_rows` streamed at a time."""

    def __init__(self, linear: DictConfig, featurizer: dict[str, Any] | None = None, chunk_rows: int = 65536) -> None:
        opts = dict(featurizer or {})
        unknown = sorted(set(opts) - set(FEATURIZER_KEYS))
        if unknown:
            raise ConfigError(f"model.featurizer: unknown keys {unknown}; allowed: {', '.join(FEATURIZER_KEYS)}")
        if int(chunk_rows) < 1:
            raise ConfigError(f"model.chunk_rows: must be >= 1, got {chunk_rows}")
        self.linear, self.featurizer, self.chunk_rows = linear, opts, int(chunk_rows)

    def build(self, spec: FeatureSpec) -> DynamicLinear:
        model = instantiate(self.linear, _convert_="all")
        model.attach_featurizer(featurizer_for(
            spec, model.n_features, str(self.featurizer.get("numeric_transform", "signed_log1p")),
            bool(self.featurizer.get("text", True)),
        ))
        model.spec = spec
        f = model.featurizer
        model.feature_names = list(f.categorical + f.numeric + f.text)
        return model

    def fit(self, run: TrainRun) -> FitResult:
        cfg = run.cfg
        if privacy_enabled(cfg):
            raise ConfigError("model=linear: FTRL has no differentially private training here; use privacy=none or model=nn")
        dm = run.data()
        frames = dm.split()
        spec = dm.spec
        train = frames["train"]
        if run.init is not None:  # an update: FTRL goes on from the fitted state, featurizer as fitted
            model = copy.deepcopy(run.init)
            model.calibrator, model.intervals = None, None
        else:
            model = self.build(spec)
            model.featurizer.fit(train)
        history: list[dict[str, float]] = []
        if cfg.get("train", True):
            for epoch in range(model.epochs):
                row = {"epoch": epoch, "train/loss": stream_pass(model, spec, train, self.chunk_rows, score=epoch == 0)}
                if len(frames.get("val", ())):
                    val, _ = score_frame(model, frames["val"], "val")
                    row.update({k: val[k] for k in ("val/logloss", "val/auc")})
                history.append(row)
                for lg in run.loggers:
                    lg.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                log.info("linear pass %d: %s", epoch, row)
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
        nnz = int(np.count_nonzero(model.get_coefficients()))
        summary = "\n".join(filter(None, [
            (f"DynamicLinear (FTRL-Proximal), {model.regularization} regularisation, {model.epochs} pass(es), "
             f"{model.rows_seen} rows seen, {nnz} nonzero weights of {model.n_features} hashed features."),
            f"Fields not used: {', '.join(f.name for f in spec.image)} (images)." if spec.image else "",
        ]))
        return FitResult(model=model, frames=frames, metrics=metrics, history=history, log_step=len(history),
                         summary={"Model": summary})


def update_bundle(bundle: str | Path, frame: pd.DataFrame, out: str | Path | None = None) -> DynamicLinear:
    """Continue training a saved DynamicLinear bundle on new labelled rows (in order) and save it
    (in place unless `out`). The calibrator is kept as fitted; refit it when the data has drifted."""
    model = BaseMLModel.load(bundle)
    if not isinstance(model, DynamicLinear):
        raise BundleError(f"{bundle}: holds a {type(model).__name__}; update_bundle continues DynamicLinear bundles")
    if model.featurizer is None or model.spec is None:
        raise BundleError(f"{bundle}: has no featurizer or feature spec, so it cannot featurise a DataFrame")
    spec = model.spec
    if spec.label not in frame.columns:
        raise ValueError(f"update_bundle: the new rows lack the label column {spec.label!r}")
    # check only the fields the featurizer reads: new rows need no images
    used = set(model.featurizer.categorical + model.featurizer.numeric + model.featurizer.text)
    FeatureSpec([f for f in spec.fields if f.name in used], label=spec.label, weight=spec.weight).validate_frame(
        frame, require_label=True
    )
    y, sw = targets(spec, frame)
    model.fit_incremental(frame, y, sw)
    model.metadata["updates"] = list(model.metadata.get("updates", [])) + [{"rows": len(frame)}]
    model.save(Path(out) if out is not None else Path(bundle))
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Continue training a DynamicLinear bundle on new labelled rows.")
    ap.add_argument("bundle")
    ap.add_argument("rows", help="a .csv or .parquet file with the bundle's feature columns and the label")
    ap.add_argument("--out", default=None, help="write the updated bundle here instead of in place")
    args = ap.parse_args(argv)
    path = Path(args.rows)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    model = update_bundle(args.bundle, frame, args.out)
    print(f"{args.out or args.bundle}: {model.rows_seen} rows seen", flush=True)


if __name__ == "__main__":
    main()
