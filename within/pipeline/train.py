"""The training run: seed -> datamodule -> module -> callbacks -> loggers -> Trainer.fit ->
post-fit steps (calibrate ... export) with the best checkpoint -> test report.

Only rank 0 runs the post-fit steps and writes report/ and bundle/.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from within.lit.history import MetricHistory
from within.models.predictor import AdScorePredictor
from within.pipeline.config import MODEL_SHORTCUTS, register_resolvers, validate_config
from within.pipeline.linear import is_linear, run_linear
from within.pipeline.report import (
    plot_reliability,
    plot_training_curve,
    score_frame,
    write_markdown,
    write_metrics,
)
from within.postfit import PostfitContext, postfit_test_metrics, report_sections, run_steps

_MISSING = object()
log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb_run_id.txt"


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """'auto' resumes this run directory's last.ckpt when present (pre-empted cluster jobs)."""
    if ckpt_path == "auto":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: {ckpt_path} does not exist")
    return ckpt_path


def _wandb_run_id(ckpt_path: str | None, out_dir: Path) -> str:
    """Reuse the W&B run id of the run being resumed, so its curves continue in one W&B run."""
    if ckpt_path:
        saved = Path(ckpt_path).resolve().parents[1] / WANDB_ID_FILE
        if saved.is_file():
            return saved.read_text().strip()
    saved = out_dir / WANDB_ID_FILE
    if saved.is_file():
        return saved.read_text().strip()
    import wandb

    return wandb.util.generate_id()


def instantiate_group(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(sub) for sub in node.values() if isinstance(sub, DictConfig) and "_target_" in sub]


def build_loggers(cfg: DictConfig, out_dir: Path, ckpt_path: str | None) -> list[Any]:
    if cfg.get("logger") and "wandb" in cfg.logger:
        run_id = _wandb_run_id(ckpt_path, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / WANDB_ID_FILE).write_text(run_id)
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"
    return instantiate_group(cfg.get("logger"))




def privacy_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("privacy") and cfg.privacy.get("enabled"))


def build_module(cfg: DictConfig, input_dim: dict[str, Any]) -> tuple[L.LightningModule, str, dict[str, Any]]:
    extra = {"dp_compatible": True} if privacy_enabled(cfg) else {}  # no BatchNorm, DP attention
    net = instantiate(cfg.model.net, input_dim=input_dim, _convert_="all", **extra)
    net_kwargs = OmegaConf.to_container(cfg.model.net, resolve=True)
    net_kwargs.pop("_target_")
    net_kwargs.update(input_dim=input_dim, **extra)
    module_cfg = OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k != "net" and k not in MODEL_SHORTCUTS])
    module = instantiate(module_cfg, net=net)
    return module, type(net).__name__, net_kwargs


def extra_callbacks(cfg: DictConfig, module: L.LightningModule) -> list[L.Callback]:
    """Callbacks the model's own settings call for (noise annealing, dropout tuning)."""
    out: list[L.Callback] = []
    net_cfg = cfg.model.get("net", {})
    if net_cfg.get("enable_quantum_noise"):
        from within.lit.dynamics import NoiseAnnealing

        out.append(NoiseAnnealing())
    if net_cfg.get("adaptive_dropout"):
        from within.lit.dynamics import AdaptiveDropoutTuner

        out.append(AdaptiveDropoutTuner())
    return out


def load_best_weights(module: L.LightningModule, trainer: L.Trainer) -> str | None:
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    if best and Path(best).is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        return best
    return None


def run_train_job(cfg: DictConfig) -> float | None:
    """train.py's entry: in a multirun sweep a crashed job is logged and scored NaN (a failed
    trial for Optuna) instead of killing the whole sweep; a single run raises as usual."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:
        return run_train(cfg)
    try:
        return run_train(cfg)
    except Exception:
        import traceback

        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        log.exception("sweep job failed; recorded in %s/error.txt and the sweep goes on", out)
        return float("nan")


def build_datamodule(cfg: DictConfig, source: Any = None) -> Any:
    """The configured datamodule; `source` (a DataFrame) replaces the configured data source."""
    features = OmegaConf.to_container(cfg.features, resolve=True)
    # text_model group: the processor embeds text with it (hashing = the tokenizer, as before)
    text_model = OmegaConf.to_container(cfg.text_model, resolve=True) if cfg.get("text_model") else None
    if source is None:
        return instantiate(cfg.data, features=features, seed=cfg.seed, text_model=text_model)
    node = OmegaConf.masked_copy(cfg.data, [k for k in cfg.data if k != "source"])
    return instantiate(node, source=source, features=features, seed=cfg.seed, text_model=text_model)


def run_train(cfg: DictConfig, source: Any = None) -> float | None:
    """Entry point behind train.py; returns the sweep objective (cfg.optimized_metric) if set.

    `source`: an in-memory DataFrame to train on instead of the configured data source.
    """
    register_resolvers()
    validate_config(cfg, "train")
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if is_linear(cfg.model):  # model=linear: FTRL over hashed features, no Lightning trainer
        return run_linear(cfg, source)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    ensemble = ensemble_settings(cfg)
    # an ensemble member's run keeps the data seed (same rows and splits) and shifts the model seed
    L.seed_everything(cfg.seed + int((cfg.get("ensemble") or {}).get("member", 0)), workers=True)

    datamodule = build_datamodule(cfg, source)
    datamodule.setup("fit")
    module, net_class, net_kwargs = build_module(cfg, datamodule.processor.input_dim)

    history = MetricHistory()
    callbacks = instantiate_group(cfg.get("callbacks")) + extra_callbacks(cfg, module) + [history]
    if privacy_enabled(cfg):
        from within.lit.dp import configure_privacy

        # swaps in the DP module (private optimizer + Poisson loader) and adds DPTrainingValidator
        module, dp_callbacks = configure_privacy(cfg, module, datamodule)
        callbacks += dp_callbacks
    loggers = build_loggers(cfg, out_dir, ckpt_path)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.extras.get("print_config") and trainer.is_global_zero:
        from within.pipeline.console import print_config

        print_config(cfg)
    objective: float | None = None
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if not trainer.is_global_zero:
            return None
        best = load_best_weights(module, trainer)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        predictor = AdScorePredictor(
            processor=datamodule.processor, net=module.net.cpu().eval(), net_class=net_class, net_kwargs=net_kwargs
        )
        if ensemble is not None:
            predictor = build_ensemble(cfg, ensemble, predictor, source, out_dir, datamodule.frames)
        ctx = PostfitContext(
            predictor=predictor,
            frames=datamodule.frames,
            out_dir=out_dir,
            config=run_config(cfg),
            calibrator_factory=_calibrator_factory(cfg),
            metrics=metrics,
            metadata={"best_checkpoint": best},
        )
        if privacy_enabled(cfg):
            from within.lit.dp import privacy_report

            ctx.metadata["privacy"] = privacy_report(module, trainer, out_dir / "report")

        def score_test(c: PostfitContext) -> None:
            if cfg.get("test", True):
                _write_test_report(c, history, trainer)

        run_steps(list(cfg.get("postfit") or []), ctx, score_test)
        if cfg.get("optimized_metric"):
            objective = ctx.metrics.get(cfg.optimized_metric)
    finally:
        _close_wandb(loggers)
    print(out_dir, flush=True)  # the last line: where everything is
    return objective


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config without Hydra's own node (its sweep keys only resolve inside a sweep)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def ensemble_settings(cfg: DictConfig) -> DictConfig | None:
    """The `ensemble:` node of model=ensemble (None for one model, or inside a member's own run)."""
    from within.pipeline.config import ConfigError

    node = cfg.get("ensemble")
    if not node or node.get("member"):
        return None
    size = int(node.get("size", 3))
    if size < 0 or (size == 0 and not node.get("bundles")):
        raise ConfigError(f"ensemble.size: {size}; train >= 1 members, or set 0 with ensemble.bundles=[path, ...]")
    if size == 0 and cfg.get("train", True):
        raise ConfigError("ensemble.size=0 assembles ensemble.bundles only; set train=false as well")
    overrides = list(node.get("member_overrides") or [])
    if len(overrides) > max(size - 1, 0):
        raise ConfigError(f"ensemble.member_overrides: {len(overrides)} entries for members 1..{size - 1}; "
                          f"give at most size - 1 = {max(size - 1, 0)} (member 0 is this run's own config)")
    for k, entry in enumerate(overrides, start=1):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"ensemble.member_overrides[{k - 1}]: expected a mapping of config keys to values, "
                              f"e.g. {{model.net.cross_layers: 1}}, got {entry!r}")
        for key in entry:
            if OmegaConf.select(cfg, str(key), default=_MISSING) is _MISSING:
                raise ConfigError(f"ensemble.member_overrides[{k - 1}]: {key!r} is not a key of this run's config; "
                                  "members take overrides of existing keys only (e.g. model.net.dropout_rate)")
        member = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        _apply_overrides(member, entry)
        try:  # a bad value fails now, not after member 0 has trained
            validate_config(member)
        except ConfigError as err:
            raise ConfigError(f"ensemble.member_overrides[{k - 1}]: {err}") from err
    if size > 1 and privacy_enabled(cfg):
        raise ConfigError(f"ensemble.size={size} with privacy=dp trains {size} models on the same rows, spending "
                          "the privacy budget that many times; use ensemble.size=1 with ensemble.bundles, or privacy=none")
    return node


def _apply_overrides(cfg: DictConfig, entry: Mapping[str, Any]) -> None:
    """Set each dotted key of `entry` in cfg (an ensemble member's own settings)."""
    with open_dict(cfg):
        for key, value in entry.items():
            OmegaConf.update(cfg, str(key), value, merge=False)


def build_ensemble(cfg: DictConfig, node: DictConfig, own: AdScorePredictor, source: Any, out_dir: Path,
                   frames: dict[str, Any]) -> AdScorePredictor:
    """model=ensemble: this run's model is member 0; members 1..size-1 are full runs under members/<k>/
    (same data and splits, model seed + k, plus ensemble.member_overrides[k - 1] where given: members of
    different model types); ensemble.bundles are added as saved."""
    import copy

    from within.models.ensemble import CalibratedEnsemble

    members = [own] if int(node.size) >= 1 else []
    overrides = list(node.get("member_overrides") or [])
    for k in range(1, int(node.size)):
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            _apply_overrides(sub, overrides[k - 1] if k - 1 < len(overrides) else {})
            sub.paths.output_dir = str(out_dir / "members" / str(k))
            sub.ensemble = {"member": k}
            sub.postfit, sub.test, sub.ckpt_path = ["export"], False, None
            sub.export = {"onnx": False}
            sub.extras.print_config = False
        run_train(sub, source)
        members.append(AdScorePredictor.load(out_dir / "members" / str(k) / "bundle"))
    members += [AdScorePredictor.load(path) for path in node.get("bundles") or []]
    factory = _calibrator_factory(cfg)
    ensemble = CalibratedEnsemble(
        members, calibration_method=factory().type_name if factory else "none",
        aggregation_method=node.get("aggregation_method", "mean"), trim_fraction=float(node.get("trim_fraction", 0.2)),
    )
    if ensemble.aggregation_method == "weighted":
        window = node.get("weight_window")
        ensemble.update_weights(frames["val"], window=None if window is None else int(window))
    return ensemble


def _calibrator_factory(cfg: DictConfig) -> Any:
    node = cfg.get("calibrator")
    if not node or "_target_" not in node:
        return None
    return lambda: instantiate(node, _convert_="all")


def _write_test_report(ctx: PostfitContext, history: MetricHistory, trainer: L.Trainer) -> None:
    test = ctx.frames["test"]
    metrics, p = score_frame(ctx.predictor, test, "test")
    ctx.metrics.update(metrics)
    spec = ctx.predictor.processor.spec
    report = ctx.report_dir
    y = test[spec.label].to_numpy(dtype=float)
    truth = test[spec.truth].to_numpy(dtype=float) if spec.truth and spec.truth in test else None
    weight = test[spec.weight].to_numpy(dtype=float) if spec.weight else None
    curves = {"calibrated" if ctx.predictor.calibrator is not None else "model": p}
    if ctx.predictor.calibrator is not None:
        import numpy as np

        curves["uncalibrated"] = 1.0 / (1.0 + np.exp(-ctx.predictor.predict_logits(test)))
    plot_reliability(curves, y, report / "reliability.png", truth=truth, weight=weight)
    plot_training_curve(history.rows, report / "training_curve.png")
    ctx.metrics.update(postfit_test_metrics(ctx, test))  # interval coverage, uncalibrated Field-RCE
    write_metrics(ctx.metrics, report)
    write_markdown(report, ctx.metrics, extra=report_sections(ctx.metrics, alpha=ctx.settings("intervals").get("alpha", 0.1)))
    for lg in trainer.loggers:
        lg.log_metrics({k: v for k, v in metrics.items()}, step=trainer.global_step)
        lg.save()


def _close_wandb(loggers: list[Any]) -> None:
    """Always finish the W&B run, so one crashed job does not hang a sweep."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
