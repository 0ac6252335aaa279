"""model=nn: AdPredictorNN inside the AdScoreModule LightningModule, trained by a Lightning Trainer.

datamodule (fits the FeatureProcessor on train) -> network from `model.net` with the processor's
input sizes -> callbacks -> Trainer.fit (resumable from `ckpt_path`) -> the best checkpoint's
weights -> a NetworkModel. With privacy=dp the module is swapped for the DP-SGD one first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from within.lit.history import MetricHistory
from within.lit.module import AdScoreModule
from within.models.network import NetworkModel
from within.pipeline.loggers import build_callbacks
from within.pipeline.privacy import privacy_enabled
from within.pipeline.recipe import FitResult, TrainRun


class NNRecipe:
    """Recipe for model=nn. Args are the `model:` node: the network (`net`, built once the
    processor knows the input sizes), the optimizer and scheduler partials, and module options."""

    def __init__(self, net: DictConfig, optimizer: DictConfig, scheduler: DictConfig | None = None,
                 scheduler_interval: str = "epoch", compile: bool = False) -> None:
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.scheduler_interval, self.compile = scheduler_interval, bool(compile)

    def build_module(self, cfg: DictConfig, input_dim: dict[str, Any]) -> tuple[AdScoreModule, str, dict[str, Any]]:
        """(module, network class name, the network's kwargs for the bundle)."""
        extra = {"dp_compatible": True} if privacy_enabled(cfg) else {}  # no BatchNorm, DP attention
        net = instantiate(self.net, input_dim=input_dim, _convert_="all", **extra)
        # every argument the network was built with, defaults included: the bundle must rebuild this
        # structure, not what a later default (or LEGACY_KWARGS) would give
        net_kwargs = dict(getattr(net, "init_kwargs", None) or OmegaConf.to_container(self.net, resolve=True))
        net_kwargs.pop("_target_", None)
        net_kwargs.update(input_dim=input_dim, **extra)
        module = AdScoreModule(
            net=net, optimizer=instantiate(self.optimizer),
            scheduler=instantiate(self.scheduler) if self.scheduler else None,
            scheduler_interval=self.scheduler_interval, compile=self.compile,
        )
        return module, type(net).__name__, net_kwargs

    def fit(self, run: TrainRun) -> FitResult:
        cfg = run.cfg
        if privacy_enabled(cfg) and self.net.get("hierarchy"):  # before any data is loaded
            raise ValueError(
                "model.net.hierarchy does not run under DP-SGD (privacy=dp): its empirical-Bayes prior reads "
                "per-group row counts outside the private gradient; set model.net.hierarchy=null or privacy=none"
            )
        datamodule = run.data()
        datamodule.setup("fit")
        module, net_class, net_kwargs = self.build_module(cfg, datamodule.processor.input_dim)
        if run.init is not None:  # warm start: the fitted network's weights (same settings, same processor)
            module.net.load_state_dict(run.init.net.state_dict())
        history = MetricHistory()
        callbacks = build_callbacks(cfg, has_logger=bool(run.loggers)) + model_callbacks(self.net) + [history]
        if privacy_enabled(cfg):
            from within.pipeline.privacy import configure_privacy

            # swaps in the DP module (private optimizer + Poisson loader) and adds DPTrainingValidator
            module, dp_callbacks = configure_privacy(cfg, module, datamodule)
            callbacks += dp_callbacks
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=run.loggers or False)
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path)
        if not trainer.is_global_zero:
            return FitResult(model=None, frames={})
        best = load_best_weights(module, trainer)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        model = NetworkModel(processor=datamodule.processor, net=module.net.cpu().eval(), net_class=net_class,
                             net_kwargs=net_kwargs)
        metadata: dict[str, Any] = {"best_checkpoint": best}
        if privacy_enabled(cfg):
            from within.lit.privacy_report import privacy_report

            metadata["privacy"] = privacy_report(module, trainer, run.out_dir / "report")
        return FitResult(model=model, frames=datamodule.frames, metrics=metrics, history=history.rows,
                         metadata=metadata, log_step=trainer.global_step)


def model_callbacks(net_cfg: DictConfig) -> list[L.Callback]:
    """Callbacks the network's own settings call for (noise annealing, dropout tuning, the hierarchy's prior)."""
    out: list[L.Callback] = []
    if net_cfg.get("enable_quantum_noise"):
        from within.lit.dynamics import NoiseAnnealing

        out.append(NoiseAnnealing())
    if net_cfg.get("adaptive_dropout"):
        from within.lit.dynamics import AdaptiveDropoutTuner

        out.append(AdaptiveDropoutTuner())
    if net_cfg.get("hierarchy"):
        from within.lit.hierarchy import HierarchyPrior

        out.append(HierarchyPrior())
    return out


def load_best_weights(module: L.LightningModule, trainer: L.Trainer) -> str | None:
    """Put the best checkpoint's weights into `module` (weights_only: a checkpoint cannot run code)."""
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    if best and Path(best).is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        return best
    return None
