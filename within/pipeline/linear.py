"""model=linear: DynamicLinear (FTRL-Proximal over hashed features) through the train.py pipeline.

Same data splits as model=nn (the configured datamodule's split), the train split streamed in
chunks through `fit_incremental`, `linear.epochs` passes, val scored after each pass, the
configured calibrator fitted on the calib split, the test report written by the same
`score_frame` (so `test/...` names match), and a bundle that predicts on raw DataFrames.

`update_bundle(bundle, frame)` continues training a saved bundle on new labelled rows:
    python -m within.pipeline.linear BUNDLE NEW_ROWS.{csv,parquet} [--out DIR]
"""
from __future__ import annotations

import argparse
import logging
import types
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
from within.pipeline.report import (
    plot_reliability,
    plot_training_curve,
    score_frame,
    write_markdown,
    write_metrics,
)

log = logging.getLogger(__name__)
# post-fit steps that need a torch network; the linear path runs `calibrate` only
NN_ONLY_STEPS = ("intervals", "ensemble", "quantize", "export")


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


def build_linear(linear: DynamicLinear, spec: FeatureSpec, featurizer: dict | None = None,
                 chunk_rows: int = 65536) -> tuple[DynamicLinear, int]:
    """model=linear's `_target_`: (the DynamicLinear with a featurizer for `spec` attached, rows
    featurised at a time while streaming). `featurizer`: {numeric_transform, text}."""
    opts = dict(featurizer or {})
    unknown = set(opts) - {"numeric_transform", "text"}
    if unknown:
        raise ValueError(f"model.featurizer: unknown keys {sorted(unknown)}; allowed: numeric_transform, text")
    if int(chunk_rows) < 1:
        raise ValueError(f"model.chunk_rows: must be >= 1, got {chunk_rows}")
    linear.attach_featurizer(featurizer_for(
        spec, linear.n_features, str(opts.get("numeric_transform", "signed_log1p")), bool(opts.get("text", True))
    ))
    f = linear.featurizer
    linear.feature_names = list(f.categorical + f.numeric + f.text)
    return linear, int(chunk_rows)


def is_linear(model_cfg: Any) -> bool:
    """Whether a model config node is model=linear (train.py dispatches on this)."""
    return str(model_cfg.get("_target_", "")) == f"{__name__}.build_linear"


def targets(spec: FeatureSpec, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """(y in [0, 1], sample weight): aggregated rows (spec.weight) become CTR weighted by impressions."""
    y = frame[spec.label].to_numpy(dtype=np.float64)
    if not spec.weight:
        return y, None
    w = frame[spec.weight].to_numpy(dtype=np.float64)
    return np.divide(y, w, out=np.zeros_like(y), where=w > 0), w


def stream_pass(model: DynamicLinear, spec: FeatureSpec, frame: pd.DataFrame, chunk_rows: int) -> float:
    """One in-order pass over `frame`; returns the progressive-validation log loss (each minibatch
    scored before the model trains on it, the usual online training loss)."""
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
            model.fit_incremental(X[sl], y[sl], None if sw is None else sw[sl])
    return total / max(weight, 1e-12)


def _scorer(model: DynamicLinear, spec: FeatureSpec) -> Any:
    """What `score_frame` reads: `.processor.spec` and `.predict(df)`."""
    return types.SimpleNamespace(processor=types.SimpleNamespace(spec=spec), predict=model.predict)


def load_splits(cfg: DictConfig, source: Any) -> tuple[FeatureSpec, dict[str, pd.DataFrame]]:
    """The configured datamodule's spec and splits, without building the NN's tensors."""
    from within.data.datamodule import split_frame
    from within.pipeline.train import build_datamodule

    dm = build_datamodule(cfg, source)
    df = dm.load_frame()
    dm.spec.validate_frame(df, require_label=True)
    frames = split_frame(df, dm.spec, dm.split_method, dm.val_frac, dm.test_frac, dm.seed, dm.calib_frac)
    return dm.spec, frames


def calibrate(model: DynamicLinear, spec: FeatureSpec, frames: dict[str, pd.DataFrame], factory: Any,
              metrics: dict[str, float]) -> str | None:
    """Fit the configured calibrator on the calib split's logits (val if there is none)."""
    from within.calibration.metrics import ece

    model.calibrator = None
    if factory is None:
        return None
    split = "calib" if len(frames.get("calib", ())) else "val"
    frame = frames[split]
    calibrator = factory()
    cols = [f.name for f in spec.groups] + [c for c in getattr(calibrator, "required_columns", ()) or ()]
    cols = list(dict.fromkeys(c for c in cols if c in frame.columns))
    groups = {c: frame[c].to_numpy() for c in cols} or None
    logits = model.decision_function(frame)
    y, w = targets(spec, frame)
    calibrator.fit(logits, y, groups=groups, weight=w)
    model.calibrator, model.calibration_columns = calibrator, cols
    metrics[f"{split}/ece_uncalibrated"] = float(ece(expit(logits), y, weight=w))
    metrics[f"{split}/ece_calibrated"] = float(ece(calibrator.transform(logits, groups=groups), y, weight=w))
    return split


def run_linear(cfg: DictConfig, source: Any = None) -> float | None:
    """train.py for model=linear: returns cfg.optimized_metric when set; prints the run directory last."""
    import lightning as L

    from within.pipeline.config import ConfigError
    from within.pipeline.train import (
        _calibrator_factory,
        _close_wandb,
        build_loggers,
        privacy_enabled,
        run_config,
    )

    if privacy_enabled(cfg):
        raise ConfigError("model=linear: FTRL has no differentially private training here; use privacy=none or model=nn")
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    spec, frames = load_splits(cfg, source)
    # partial: a FeatureSpec passed through instantiate would be turned into a dict
    model, chunk_rows = instantiate(cfg.model, _convert_="all", _partial_=True)(spec=spec)
    train = frames["train"]
    model.featurizer.fit(train)
    loggers = build_loggers(cfg, out_dir, None)
    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        for epoch in range(model.epochs):
            row = {"epoch": epoch, "train/loss": stream_pass(model, spec, train, chunk_rows)}
            if len(frames.get("val", ())):
                val, _ = score_frame(_scorer(model, spec), frames["val"], "val")
                row.update({k: val[k] for k in ("val/logloss", "val/auc")})
            history.append(row)
            for lg in loggers:
                lg.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info("linear pass %d: %s", epoch, row)
        metrics.update({k: v for k, v in history[-1].items() if k != "epoch"})
    steps = list(cfg.get("postfit") or [])
    skipped = [s for s in steps if s in NN_ONLY_STEPS]
    if skipped:
        log.info("model=linear: post-fit steps %s apply to networks only; skipped", skipped)
    calib_split = calibrate(model, spec, frames, _calibrator_factory(cfg), metrics) if "calibrate" in steps else None
    report = out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    if cfg.get("test", True):
        test = frames["test"]
        test_metrics, p = score_frame(_scorer(model, spec), test, "test")
        metrics.update(test_metrics)
        w = test[spec.weight].to_numpy(dtype=float) if spec.weight else None
        truth = test[spec.truth].to_numpy(dtype=float) if spec.truth and spec.truth in test else None
        curves = {"calibrated" if model.calibrator is not None else "model": p}
        if model.calibrator is not None:
            curves["uncalibrated"] = expit(model.decision_function(test))
        # plot_reliability expects click counts with a weight, like the nn report
        plot_reliability(curves, test[spec.label].to_numpy(dtype=float), report / "reliability.png", truth=truth, weight=w)
        for lg in loggers:
            lg.log_metrics(test_metrics, step=len(history))
    plot_training_curve(history, report / "training_curve.png")
    for lg in loggers:
        lg.save()
    _close_wandb(loggers)
    write_metrics(metrics, report)
    nnz = int(np.count_nonzero(model.get_coefficients()))
    summary = "\n".join([
        (f"DynamicLinear (FTRL-Proximal), {model.regularization} regularisation, {model.epochs} pass(es), "
         f"{model.rows_seen} rows seen, {nnz} nonzero weights of {model.n_features} hashed features."),
        f"Calibrated on the {calib_split} split." if calib_split else "No calibrator.",
        f"Post-fit steps skipped (networks only): {', '.join(skipped)}." if skipped else "",
        f"Fields not used: {', '.join(f.name for f in spec.image)} (images)." if spec.image else "",
    ])
    write_markdown(report, metrics, extra={"Model": summary})
    model.metadata = {"metrics": metrics, "config": run_config(cfg), "spec": spec.to_dict(),
                      "calibration_split": calib_split}
    model.save(out_dir / "bundle")
    print(out_dir, flush=True)  # the last line: where everything is
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


def update_bundle(bundle: str | Path, frame: pd.DataFrame, out: str | Path | None = None) -> DynamicLinear:
    """Continue training a saved DynamicLinear bundle on new labelled rows (in order) and save it
    (in place unless `out`). The calibrator is kept as fitted; refit it when the data has drifted."""
    model = BaseMLModel.load(bundle)
    if not isinstance(model, DynamicLinear):
        raise BundleError(f"{bundle}: holds a {type(model).__name__}; update_bundle continues DynamicLinear bundles")
    if model.featurizer is None:
        raise BundleError(f"{bundle}: has no featurizer config, so it cannot featurise a DataFrame")
    spec_d = model.metadata.get("spec")
    spec = FeatureSpec.from_dict(spec_d) if spec_d else None
    label = spec.label if spec else "clicked"
    if label not in frame.columns:
        raise ValueError(f"update_bundle: the new rows lack the label column {label!r}")
    if spec is not None:
        # check only the fields the featurizer reads: new rows need no images
        used = set(model.featurizer.categorical + model.featurizer.numeric + model.featurizer.text)
        FeatureSpec([f for f in spec.fields if f.name in used], label=spec.label, weight=spec.weight).validate_frame(
            frame, require_label=True
        )
        y, sw = targets(spec, frame)
    else:
        y, sw = frame[label].to_numpy(dtype=np.float64), None
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
