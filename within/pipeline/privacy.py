"""privacy=dp's config: check the settings, refuse trainer options that would act on private
gradients behind Opacus' back, derive the noise from the target epsilon, and swap in the DP module.

`configure_privacy(cfg, module, datamodule)` turns on Poisson sampling, derives the noise multiplier
from the target epsilon, and returns a `DPAdScoreModule` (the same net and optimizer factory) plus a
`DPTrainingValidator` callback.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from within.lit.dp_module import ROW_ID, DPAdScoreModule
from within.lit.module import AdScoreModule
from within.privacy.audit import draw_canaries
from within.privacy.engine import (
    ACCOUNTANTS,
    DP_PRECISIONS,
    GRAD_SAMPLE_MODES,
    PrivacyConfigError,
    default_delta,
    is_finite_positive,
    noise_for_target,
    steps_per_epoch,
)
from within.privacy.validator import AUDIT_DEFAULTS, DPTrainingValidator

log = logging.getLogger(__name__)

PRIVACY_KEYS = {
    "enabled", "target_epsilon", "target_delta", "max_grad_norm", "noise_multiplier", "accountant",
    "grad_sample_mode", "poisson_sampling", "secure_mode", "max_physical_batch_size", "audit", "lr", "lr_decay",
}


def privacy_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("privacy") and cfg.privacy.get("enabled"))


def privacy_settings(cfg: DictConfig) -> dict[str, Any]:
    """cfg.privacy as a dict, unknown keys refused with a suggestion."""
    p = OmegaConf.to_container(cfg.privacy, resolve=True)
    for key in p:
        if key not in PRIVACY_KEYS:
            close = difflib.get_close_matches(key, sorted(PRIVACY_KEYS), n=1)
            raise PrivacyConfigError(f"privacy.{key}: unknown setting" + (f"; did you mean '{close[0]}'?" if close else ""))
    p.setdefault("accountant", "prv")
    p.setdefault("grad_sample_mode", "ghost")
    p.setdefault("poisson_sampling", True)
    if p["accountant"] not in ACCOUNTANTS:
        raise PrivacyConfigError(f"privacy.accountant: {p['accountant']!r} is not one of {list(ACCOUNTANTS)}")
    if p["grad_sample_mode"] not in GRAD_SAMPLE_MODES:
        raise PrivacyConfigError(
            f"privacy.grad_sample_mode: {p['grad_sample_mode']!r} is not one of {list(GRAD_SAMPLE_MODES)}"
        )
    return p


def check_trainer(cfg: DictConfig) -> None:
    """Refuse trainer settings that would act on private gradients behind Opacus' back."""
    t = cfg.trainer
    acc = t.get("accumulate_grad_batches", 1)
    if acc not in (1, None):
        raise PrivacyConfigError(
            f"trainer.accumulate_grad_batches={acc} is not allowed with privacy=dp: Lightning would sum noised "
            "gradients and the accountant would miscount. Keep it 1; for a large logical batch raise "
            "data.batch_size and set privacy.max_physical_batch_size (Opacus virtual steps)"
        )
    if t.get("gradient_clip_val") not in (None, 0, 0.0):
        raise PrivacyConfigError(
            f"trainer.gradient_clip_val={t.gradient_clip_val} is not allowed with privacy=dp: DP-SGD clips each "
            "row's gradient itself. Set it null and use privacy.max_grad_norm"
        )
    precision = str(t.get("precision", "32-true"))
    if precision not in DP_PRECISIONS:
        raise PrivacyConfigError(
            f"trainer.precision={precision} is not supported with privacy=dp: per-sample gradient norms in 16-bit "
            "round by up to 0.4%, so clipped gradients can exceed max_grad_norm and the noise no longer covers "
            "the sensitivity. Set trainer.precision=32-true"
        )
    strategy = t.get("strategy", "auto")
    if isinstance(strategy, str) and strategy not in ("auto", "ddp", "single_device"):
        raise PrivacyConfigError(
            f"trainer.strategy={strategy} is not supported with privacy=dp; use trainer=ddp or trainer=ddp_cpu "
            "(Opacus DPDDP) or a single device"
        )
    if strategy in ("auto", "single_device", None) and str(t.get("devices", 1)) not in ("1", "[0]"):
        raise PrivacyConfigError(
            f"trainer.devices={t.get('devices')} with strategy {strategy}: several devices need trainer=ddp under "
            "privacy=dp (Opacus DPDDP), or set trainer.devices=1"
        )


def planned_steps(cfg: DictConfig, per_epoch: int) -> int:
    epochs = cfg.trainer.get("max_epochs")
    if epochs is None or int(epochs) < 1:
        raise PrivacyConfigError(
            f"trainer.max_epochs={epochs}: privacy=dp plans the noise for a known number of steps; set it >= 1"
        )
    steps = int(epochs) * per_epoch
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is not None and int(max_steps) > 0:
        steps = min(steps, int(max_steps))
    return steps


def configure_privacy(cfg: DictConfig, module: AdScoreModule, datamodule: Any) -> tuple[DPAdScoreModule, list]:
    """Swap in the DP module and add DPTrainingValidator; refuse non-private settings before any step.

    Derives `noise_multiplier` with Opacus' get_noise_multiplier for max_epochs * floor(1/q)
    steps when it is null, under both the PRV and the RDP accountant, keeping the larger noise, so the
    target holds whichever accountant recomputes it; `target_delta` null -> 1/(10 N).
    """
    p = privacy_settings(cfg)
    check_trainer(cfg)
    if p.get("poisson_sampling"):
        datamodule.poisson_sampling = True
    n, q = int(datamodule.n_train), float(datamodule.sample_rate)
    delta = p.get("target_delta")
    delta = default_delta(n) if delta is None else float(delta)
    audit = {**AUDIT_DEFAULTS, **dict(p.get("audit") or {})}
    report_dir = Path(cfg.paths.output_dir) / "report"
    per_epoch = steps_per_epoch(q)
    steps = planned_steps(cfg, per_epoch)
    target = p.get("target_epsilon")
    sigma = p.get("noise_multiplier")
    # settings that need no noise value first, so a bad delta/clip is named before any search
    pre = DPTrainingValidator(None, delta, p.get("max_grad_norm"), 1.0 if sigma is None else sigma,
                              p["accountant"], audit)
    pre.validate_training_params({"n_train": n, "sample_rate": q, "planned_steps": steps,
                                  "poisson_sampling": p.get("poisson_sampling")})
    if sigma is None:
        if target is None:
            raise PrivacyConfigError(
                "privacy.noise_multiplier and privacy.target_epsilon are both null: set a target epsilon "
                "(the noise is derived from it) or the noise multiplier"
            )
        # the larger of the PRV and RDP answers: the target holds whichever accountant recomputes it
        sigma = max(noise_for_target(float(target), delta, q, steps, mech) for mech in ("prv", "rdp"))
        log.info("privacy: noise_multiplier %.4g gives epsilon <= %s after %d steps (q=%.4g, delta=%.3g)",
                 sigma, target, steps, q, delta)
    validator = DPTrainingValidator(target, delta, p.get("max_grad_norm"), sigma, p["accountant"], audit, report_dir)
    validator.validate_training_params({"n_train": n, "sample_rate": q, "planned_steps": steps,
                                        "poisson_sampling": True})
    optimizer = module.optimizer_factory
    lr = p.get("lr")
    if lr is not None:
        if not is_finite_positive(lr):
            raise PrivacyConfigError(f"privacy.lr={lr}: must be a finite number > 0, or null for model.optimizer.lr")
        # DP-SGD takes few, large, noisy steps: its own learning rate (the later keyword wins in a partial)
        optimizer = functools.partial(optimizer, lr=float(lr))
    scheduler = dp_scheduler(module.scheduler_factory, p.get("lr_decay"))
    dp_module = DPAdScoreModule(
        net=module.net, optimizer=optimizer, scheduler=scheduler,
        scheduler_interval=module.hparams.scheduler_interval, compile=module.hparams.compile,
        noise_multiplier=float(sigma), max_grad_norm=float(p["max_grad_norm"]), target_delta=delta,
        accountant=p["accountant"], grad_sample_mode=p["grad_sample_mode"], secure_mode=bool(p.get("secure_mode")),
        max_physical_batch_size=p.get("max_physical_batch_size"), seed=int(cfg.seed),
    )
    if audit.get("enabled") and int(audit.get("canaries") or 0) > 0:
        rows, included = draw_canaries(n, int(audit["canaries"]), int(audit["seed"]) + int(cfg.seed))
        dp_module.set_canaries(rows, included, n)
        train = datamodule.datasets["train"]
        train.tensors[ROW_ID] = torch.arange(len(train), dtype=torch.long)
    if str(cfg.trainer.get("strategy", "auto")) == "ddp":
        with open_dict(cfg):
            cfg.trainer.strategy = {"_target_": "within.lit.dp_strategy.DPDDPStrategy"}
    return dp_module, [validator]


def dp_scheduler(scheduler: Any, lr_decay: Any) -> Any:
    """The model's scheduler with `privacy.lr_decay` as its per-epoch gamma: DP-SGD's noisy steps are
    still improving when the non-DP decay (0.7 per epoch) has all but stopped them."""
    if lr_decay is None:
        return scheduler
    if isinstance(lr_decay, bool) or not isinstance(lr_decay, (int, float)) or not 0 < float(lr_decay) <= 1:
        raise PrivacyConfigError(f"privacy.lr_decay={lr_decay!r}: must be in (0, 1], or null to keep model.scheduler")
    if scheduler is None:
        return None
    func = getattr(scheduler, "func", scheduler)
    if "gamma" not in inspect.signature(func).parameters:
        # a schedule of the user's own shape (cosine, one-cycle): the DP default does not apply to it
        log.warning("privacy.lr_decay=%s ignored: model.scheduler (%s) has no gamma", lr_decay,
                    getattr(func, "__name__", type(func).__name__))
        return scheduler
    return functools.partial(scheduler, gamma=float(lr_decay))
