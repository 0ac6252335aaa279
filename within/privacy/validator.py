"""DPTrainingValidator: refuses DP runs that would not be private, tracks epsilon, audits after fit.

A Lightning callback, but it imports nothing from `within.lit`: it reads the module's
`privacy` (a `within.privacy.engine.PrivateTraining`), `net`, `per_sample_loss(batch)` and
`canaries` (rows, included) attributes, and the datamodule's `datasets` mapping.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from within.privacy.audit import membership_auc, one_run_lower_bound
from within.privacy.engine import (
    ACCOUNTANTS,
    PrivacyConfigError,
    epsilon_of,
    is_finite_positive,
    max_steps_within,
    with_steps,
)

log = logging.getLogger(__name__)

AUDIT_DEFAULTS = {"enabled": True, "canaries": 1000, "mia_samples": 5000, "bootstrap": 200,
                  "confidence": 0.95, "beta": 0.05, "seed": 0}


class DPTrainingValidator(pl.Callback):
    """Guards a DP-SGD run before, during and after `Trainer.fit`.

    Args:
        epsilon: target (budget) epsilon; None = no budget cap (noise set by hand).
        delta: target delta; must be < 1 / N_train.
        max_grad_norm: per-sample clipping norm C.
        noise_multiplier: sigma (noise std = sigma * C).
        accountant: 'prv' | 'rdp'.
        audit: knobs of the post-fit audit (see AUDIT_DEFAULTS); {"enabled": False} skips it.
        report_dir: where generate_privacy_report() writes (default: <default_root_dir>/report).
    """

    def __init__(
        self,
        epsilon: float | None,
        delta: float,
        max_grad_norm: float,
        noise_multiplier: float,
        accountant: str = "prv",
        audit: Mapping[str, Any] | None = None,
        report_dir: str | Path | None = None,
    ) -> None:
        self.epsilon, self.delta = epsilon, delta
        self.max_grad_norm, self.noise_multiplier = max_grad_norm, noise_multiplier
        self.accountant = accountant
        unknown = sorted(set(audit or {}) - set(AUDIT_DEFAULTS))
        if unknown:
            raise PrivacyConfigError(f"privacy.audit: unknown keys {unknown}; allowed: {sorted(AUDIT_DEFAULTS)}")
        self.audit = {**AUDIT_DEFAULTS, **dict(audit or {})}
        self.report_dir = Path(report_dir) if report_dir else None
        self.params: dict[str, Any] = {}
        self.audit_results: dict[str, Any] = {}
        self.stopped_for_budget = False
        self._stop_reason: str | None = None
        self._private: Any = None

    # ---- checks ---------------------------------------------------------------------------
    def validate_training_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse settings that give no privacy, naming the setting. Returns the checked params.

        `params`: n_train, sample_rate, planned_steps (further steps this fit may take),
        poisson_sampling, optional history [(noise, q, steps), ...] already spent.
        """
        p = {"epsilon": self.epsilon, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
             "noise_multiplier": self.noise_multiplier, "accountant": self.accountant, "history": [],
             **dict(params)}
        n = int(p.get("n_train") or 0)
        if n < 1:
            raise PrivacyConfigError(f"data: DP-SGD needs training rows; N_train={n}")
        if p["accountant"] not in ACCOUNTANTS:
            raise PrivacyConfigError(f"privacy.accountant: {p['accountant']!r} is not one of {list(ACCOUNTANTS)}")
        delta = p["delta"]
        if delta is None or not 0 < float(delta) < 1.0 / n:
            raise PrivacyConfigError(
                f"privacy.target_delta={delta} must be in (0, 1/N_train) = (0, {1.0 / n:.3g}); with delta >= 1/N "
                "releasing a random training row verbatim would satisfy the guarantee. Set it lower, or null "
                f"for the default 1/(10 N) = {1.0 / (10 * n):.3g}"
            )
        if not is_finite_positive(p["max_grad_norm"]):
            raise PrivacyConfigError(
                f"privacy.max_grad_norm={p['max_grad_norm']}: per-sample clipping must be a finite norm > 0 "
                "(without it one row's gradient is unbounded and no noise level covers it); e.g. 1.0"
            )
        sigma = p["noise_multiplier"]
        if not is_finite_positive(sigma):
            raise PrivacyConfigError(
                f"privacy.noise_multiplier={sigma}: must be a finite number > 0; with no noise DP-SGD gives "
                "epsilon = infinity. Set it, or null to derive it from privacy.target_epsilon"
            )
        if not p.get("poisson_sampling", False):
            raise PrivacyConfigError(
                "privacy.poisson_sampling=false: the accountant's amplification-by-subsampling bound assumes "
                "each row joins each batch independently with rate q (Poisson sampling); set it true"
            )
        q = float(p.get("sample_rate") or 0)
        if not 0 < q <= 1:
            raise PrivacyConfigError(f"data.batch_size: sample rate q = batch_size/N_train = {q} is not in (0, 1]")
        eps_target = p["epsilon"]
        if eps_target is not None:
            if not is_finite_positive(eps_target):
                raise PrivacyConfigError(f"privacy.target_epsilon={eps_target}: must be a finite number > 0")
            planned = int(p.get("planned_steps") or 0)
            projected = epsilon_of(with_steps(p["history"], float(sigma), q, planned), float(delta), p["accountant"])
            p["projected_epsilon"] = projected
            if projected > float(eps_target) * (1 + 1e-9):
                raise PrivacyConfigError(
                    f"trainer.max_epochs: the planned {planned} steps (q={q:.4g}, noise_multiplier={float(sigma):.4g}) "
                    f"would reach epsilon={projected:.3f} > privacy.target_epsilon={eps_target}. Lower "
                    "trainer.max_epochs, raise privacy.noise_multiplier, or set it null to derive it"
                )
        self.params = p
        return p

    def audit_model(self, model: nn.Module, optimizer: Any = None, hooks: Any = None,
                    datamodule: Any = None) -> dict[str, Any]:
        """Audit a model for privacy: its structure always, its leakage when it can. Returns what was done.

        `model`: the network, or the LightningModule that trained it (its `privacy` state then
        supplies the optimizer and hooks). Structure (raises PrivacyConfigError on a failure): no
        BatchNorm (it mixes rows, so per-sample clipping bounds nothing); Opacus'
        `ModuleValidator.validate`; per-sample gradient hooks attached to this model
        (GradSampleModule / GradSampleHooks); the optimizer, when known, is a DPOptimizer.

        Leakage (`empirical_audit`: membership-inference AUC and the one-run canary bound): reported
        when it already ran after fit, run now when given the trained LightningModule and a
        `datamodule` with 'train' and 'test' `datasets`, else not run. The result says which:
        {"structure_checks": [...], "leakage_audit": "reported" | "ran" | "not run",
        "leakage_note": why, "audit/...": the audit's figures}.
        """
        from opacus.grad_sample import AbstractGradSampleHooks, AbstractGradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        module = model if isinstance(getattr(model, "net", None), nn.Module) else None
        private = getattr(module, "privacy", None) if module is not None else None
        net = module.net if module is not None else model
        if private is not None:
            optimizer = optimizer if optimizer is not None else private.optimizer
            hooks = hooks if hooks is not None else private.hooks
            self._private = self._private or private
        bn = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn:
            raise PrivacyConfigError(
                f"model.net has BatchNorm layers {bn[:3]}: batch statistics mix rows, so per-sample clipping does not "
                "bound one row's influence. Build the net with dp_compatible=True (privacy=dp does this)"
            )
        errors = ModuleValidator.validate(net, strict=False)
        if errors:
            raise PrivacyConfigError(f"model.net: Opacus ModuleValidator rejects it: {errors[:3]}")
        wrapped = isinstance(net, AbstractGradSampleModule) or (
            isinstance(hooks, AbstractGradSampleHooks) and _hooked_module(hooks) is not None
            and any(m is net for m in _hooked_module(hooks).modules())
        )
        if not wrapped:
            raise PrivacyConfigError(
                "model.net is not wrapped for per-sample gradients (no GradSampleModule / GradSampleHooks on it): "
                "gradients would not be clipped per row. Train it through DPAdScoreModule (privacy=dp)"
            )
        checks = ["no BatchNorm", "Opacus ModuleValidator", "per-sample gradient hooks"]
        if optimizer is not None:
            if not isinstance(optimizer, DPOptimizer):
                raise PrivacyConfigError(
                    f"model.optimizer is a plain {type(optimizer).__name__}, not an Opacus DPOptimizer: it would "
                    "neither clip nor noise. Train through DPAdScoreModule (privacy=dp)"
                )
            checks.append("DPOptimizer")
        out: dict[str, Any] = {"structure_checks": checks}
        datasets = getattr(datamodule, "datasets", None)
        if self.audit_results:
            out.update(leakage_audit="reported", leakage_note="the empirical audit ran after fit (on_fit_end)")
        elif module is not None and callable(getattr(module, "per_sample_loss", None)) and datasets is not None:
            self.audit_results = self._leakage_audit(datasets, module)
            out.update(leakage_audit="ran", leakage_note="empirical audit run now on the datamodule's train/test rows")
        else:
            out.update(leakage_audit="not run", leakage_note=(
                "the leakage audit needs the trained LightningModule (per_sample_loss) and datamodule= with "
                "'train' and 'test' datasets, or a fit with privacy.audit.enabled=true"))
        out.update(self.audit_results)
        return out

    def check_sampler(self, loader: Any, sample_rate: float) -> None:
        """The train loader must draw Poisson batches at exactly the accountant's rate q."""
        from opacus.utils.uniform_sampler import (
            DistributedUniformWithReplacementSampler,
            UniformWithReplacementSampler,
        )

        sampler = getattr(loader, "sampler", None)
        inner = getattr(loader, "batch_sampler", None)
        found = [s for s in (sampler, inner) if isinstance(
            s, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler))]
        if not found:
            raise PrivacyConfigError(
                f"data: the train loader samples with {type(sampler).__name__}, not Poisson "
                "(UniformWithReplacementSampler); privacy accounting would not hold. Set "
                "datamodule.poisson_sampling=True (privacy=dp does this) and privacy.poisson_sampling=true"
            )
        if not math.isclose(found[0].sample_rate, sample_rate, rel_tol=1e-9):
            raise PrivacyConfigError(
                f"data.batch_size: the loader samples at q={found[0].sample_rate:.6g} but the accountant uses "
                f"q={sample_rate:.6g}; rebuild the datamodule before configure_privacy"
            )

    # ---- budget -----------------------------------------------------------------------------
    def track_privacy_budget(self, steps: int) -> dict[str, Any]:
        """Epsilon spent so far and after `steps` more steps at the run's (noise, q).

        During or after a run it reads the run's accountant; before one, the settings checked by
        `validate_training_params` (nothing spent yet beyond their `history`)."""
        if int(steps) < 0:
            raise ValueError(f"DPTrainingValidator.track_privacy_budget: steps must be >= 0, got {steps}")
        history, sigma, q, delta, accountant = self._budget_state()
        now = epsilon_of(history, delta, accountant)
        later = epsilon_of(with_steps(history, sigma, q, int(steps)), delta, accountant)
        spent = sum(int(h[2]) for h in history)
        return {"epsilon": now, "steps": spent, "projected_epsilon": later, "projected_steps": spent + int(steps),
                "within_budget": self.epsilon is None or later <= float(self.epsilon) * (1 + 1e-9)}

    def _budget_state(self) -> tuple[list, float, float, float, str]:
        """(history, noise multiplier, q, delta, accountant) of the run, or of the validated settings."""
        if self._private is not None:
            pt = self._private
            return pt.history, pt.noise_multiplier, pt.sample_rate, self.delta, pt.accountant
        p = self.params
        if not p:
            raise PrivacyConfigError(
                "DPTrainingValidator: no training run is attached and no settings were validated; train with "
                "privacy=dp, or call validate_training_params({...}) first"
            )
        return list(p["history"]), float(p["noise_multiplier"]), float(p["sample_rate"]), float(p["delta"]), \
            p["accountant"]

    def _require_private(self) -> Any:
        if self._private is None:
            raise PrivacyConfigError(
                "DPTrainingValidator: the LightningModule has no `privacy` state: it was not made private "
                "(use DPAdScoreModule via privacy=dp)"
            )
        return self._private

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._private = getattr(pl_module, "privacy", None)
        pt = self._require_private()
        self.audit_model(pl_module.net, pt.optimizer, pt.hooks)
        self.check_sampler(trainer.train_dataloader, pt.sample_rate)
        per_epoch = getattr(pl_module, "steps_per_epoch", None) or max(1, int(trainer.num_training_batches))
        epochs_left = max(0, int(trainer.max_epochs or 0) - trainer.current_epoch) if trainer.max_epochs else 0
        planned = epochs_left * per_epoch
        if trainer.max_steps and trainer.max_steps > 0:
            planned = min(planned, max(0, trainer.max_steps - trainer.global_step)) if planned else trainer.max_steps
        if planned <= 0:
            raise PrivacyConfigError("trainer.max_epochs: must be set (>= 1) under privacy=dp to plan the budget")
        self.validate_training_params({
            "n_train": getattr(pl_module, "n_train", None), "sample_rate": pt.sample_rate, "planned_steps": planned,
            "poisson_sampling": True, "history": pt.history, "noise_multiplier": pt.noise_multiplier,
            "max_grad_norm": pt.max_grad_norm, "delta": pt.delta, "accountant": pt.accountant,
        })
        if self.epsilon is not None:
            # hard cap enforced per step by the module, whatever min_epochs/should_stop do
            pt.extras["step_limit"] = pt.steps + max_steps_within(
                pt.history, pt.noise_multiplier, pt.sample_rate, pt.delta, float(self.epsilon), pt.accountant,
                upper=planned + per_epoch,
            )
        pt.extras["steps_per_epoch"] = per_epoch
        log.info("privacy: training with noise_multiplier=%.4g, q=%.4g, C=%.3g, %s accountant, %s grad samples",
                 pt.noise_multiplier, pt.sample_rate, pt.max_grad_norm, pt.accountant, pt.grad_sample_mode)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pt = self._require_private()
        state = self.track_privacy_budget(int(pt.extras.get("steps_per_epoch", 1)))
        pl_module.log("privacy/epsilon", float(state["epsilon"]), on_epoch=True, sync_dist=False)
        limit = pt.extras.get("step_limit")
        if limit is not None and state["projected_steps"] > limit and not self.stopped_for_budget:
            self.stop_for_budget(trainer, f"the next epoch would pass privacy.target_epsilon={self.epsilon} "
                                          f"(epsilon now {state['epsilon']:.3f})")

    def stop_for_budget(self, trainer: pl.Trainer, why: str) -> None:
        """Ask Lightning to stop after this batch/epoch; `on_train_end` checkpoints the state reached.

        The checkpoint is not written here: `Trainer.save_checkpoint` ends in a barrier, and under
        DDP this hook runs at a point where the ranks' collectives are not aligned (rank 0's progress
        bar syncs the epoch metrics in its own `on_train_epoch_end`, the other ranks sync them later
        in EarlyStopping), so a barrier here pairs with another rank's metric all-gather and hangs.
        No step happens after the stop, so the weights and accountant saved at train end are the same.
        """
        self.stopped_for_budget = True
        trainer.should_stop = True
        self._stop_reason = why
        log.warning("privacy: stopping training: %s", why)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank reaches this hook once, after the loops, with no metric sync pending
        if not self.stopped_for_budget:
            return
        ckpt_cb = trainer.checkpoint_callback
        dirpath = Path(getattr(ckpt_cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
        trainer.save_checkpoint(str(dirpath / "privacy_budget_stop.ckpt"))
        log.warning("privacy: budget stop checkpoint %s", dirpath / "privacy_budget_stop.ckpt")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._private is None or not self.audit.get("enabled", True) or not trainer.is_global_zero:
            return
        self.audit_results = self.empirical_audit(trainer, pl_module)

    # ---- post-fit audit -------------------------------------------------------------------------
    def empirical_audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """MIA AUC (train rows vs test rows) with a bootstrap CI, plus the one-run canary bound."""
        return self._leakage_audit(getattr(trainer.datamodule, "datasets", None), pl_module)

    def _leakage_audit(self, datasets: Any, pl_module: pl.LightningModule) -> dict[str, Any]:
        if not isinstance(datasets, Mapping) or "train" not in datasets or "test" not in datasets:
            raise PrivacyConfigError("privacy.audit: the datamodule needs `datasets` with 'train' and 'test' splits; "
                                     "or set privacy.audit.enabled=false")
        cfg = self.audit
        rng = np.random.default_rng(int(cfg["seed"]))
        train, test = datasets["train"], datasets["test"]
        canaries = getattr(pl_module, "canaries", None)
        not_member = np.zeros(len(train), bool)
        if canaries is not None:
            not_member[canaries[0]] = True  # canaries are scored separately
        members = np.flatnonzero(~not_member)
        k = int(min(cfg["mia_samples"], len(members), len(test)))
        mem_idx = np.sort(rng.choice(members, size=k, replace=False))
        non_idx = np.sort(rng.choice(len(test), size=k, replace=False))
        out: dict[str, Any] = {}
        mia = membership_auc(_losses(pl_module, train, mem_idx), _losses(pl_module, test, non_idx),
                             n_boot=int(cfg["bootstrap"]), confidence=float(cfg["confidence"]), seed=int(cfg["seed"]))
        out.update({f"audit/mia_{k_}": v for k_, v in mia.items()})
        if canaries is not None and len(canaries[0]):
            scores = -_losses(pl_module, train, canaries[0])
            res = one_run_lower_bound(scores, canaries[1], beta=float(cfg["beta"]))
            out.update({f"audit/{k_}": v for k_, v in res.items()})
            reported = self._require_private().epsilon(self.delta)
            out["audit/lower_bound_le_epsilon"] = bool(res["epsilon_lower_bound"] <= reported)
        return out

    # ---- report -------------------------------------------------------------------------------
    def generate_privacy_report(self, report_dir: str | Path | None = None) -> dict[str, Any]:
        """Write report/privacy.json (flat keys) and report/privacy.md; return the same dict.

        After (or during) a run: the guarantee spent, `status` 'trained'. Before one, after
        `validate_training_params`: the guarantee the planned steps would give, `status` 'planned'."""
        import lightning
        import opacus

        versions = {"version/opacus": opacus.__version__, "version/torch": torch.__version__,
                    "version/lightning": lightning.__version__}
        report = self._run_report() if self._private is not None else self._planned_report()
        report.update(versions)
        out = Path(report_dir) if report_dir else self.report_dir
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "privacy.json").write_text(json.dumps(report, indent=2, default=float))
            (out / "privacy.md").write_text(_markdown(report))
        return report

    def _planned_report(self) -> dict[str, Any]:
        history, sigma, q, delta, accountant = self._budget_state()
        planned = with_steps(history, sigma, q, int(self.params.get("planned_steps") or 0))
        eps = {m: epsilon_of(planned, delta, m) for m in ACCOUNTANTS}
        return {
            "status": "planned", "epsilon": eps[accountant], "delta": delta, "noise_multiplier": sigma,
            "sample_rate": q, "steps": sum(int(h[2]) for h in planned), "accountant": accountant,
            "max_grad_norm": self.params["max_grad_norm"], "target_epsilon": self.epsilon,
            "epsilon_prv": eps["prv"], "epsilon_rdp": eps["rdp"], "history": [list(h) for h in planned],
            "poisson_sampling": bool(self.params.get("poisson_sampling")), "n_train": self.params.get("n_train"),
            **self.audit_results,
        }

    def _run_report(self) -> dict[str, Any]:
        pt = self._private
        eps = {m: epsilon_of(pt.history, pt.delta, m) for m in ACCOUNTANTS}
        return {
            "status": "trained",
            "epsilon": eps[pt.accountant], "delta": pt.delta, "noise_multiplier": pt.noise_multiplier,
            "sample_rate": pt.sample_rate, "steps": pt.steps, "accountant": pt.accountant,
            "max_grad_norm": pt.max_grad_norm, "target_epsilon": self.epsilon,
            "epsilon_prv": eps["prv"], "epsilon_rdp": eps["rdp"],
            "history": [list(h) for h in pt.history], "expected_batch_size": pt.expected_batch_size * pt.world_size,
            "world_size": pt.world_size, "poisson_sampling": True, "secure_mode": pt.secure_mode,
            "grad_sample_mode": pt.grad_sample_mode, "requested_grad_sample_mode": pt.requested_grad_sample_mode,
            "grad_sample_fallback": pt.fallback_reason, "stopped_for_budget": self.stopped_for_budget,
            "stop_reason": self._stop_reason,
            "n_train": self.params.get("n_train"),
            **self.audit_results,
        }


def _hooked_module(hooks: Any) -> nn.Module | None:
    return getattr(hooks, "_module", None)


@torch.no_grad()
def _losses(pl_module: pl.LightningModule, dataset: Any, idx: np.ndarray, chunk: int = 4096) -> np.ndarray:
    was_training = pl_module.training
    pl_module.eval()
    try:
        parts = []
        for s in range(0, len(idx), chunk):
            batch = {k: v.to(pl_module.device) for k, v in dataset[idx[s: s + chunk]].items()}
            parts.append(pl_module.per_sample_loss(batch).double().cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros(0)
    finally:
        pl_module.train(was_training)


def _markdown(r: Mapping[str, Any]) -> str:
    planned = r.get("status") == "planned"
    lines = [
        "# Privacy report", "",
        f"DP-SGD (Opacus {r['version/opacus']}): ({r['epsilon']:.3f}, {r['delta']:.3g})-DP at the row level, "
        f"{r['accountant'].upper()} accountant"
        + (f", if training takes the planned {r['steps']} steps (no training run attached yet)." if planned else "."),
        "",
        "| setting | value |", "| --- | --- |",
    ]
    for k in ("epsilon", "epsilon_prv", "epsilon_rdp", "target_epsilon", "delta", "noise_multiplier", "max_grad_norm",
              "sample_rate", "steps", "expected_batch_size", "world_size", "grad_sample_mode", "stopped_for_budget"):
        lines.append(f"| {k} | {r.get(k)} |")
    audit = {k: v for k, v in r.items() if k.startswith("audit/")}
    if audit:
        lines += ["", "## Empirical audit", "",
                  ("Loss-threshold membership inference (train rows vs test rows, bootstrap CI) and the one-run "
                  "canary audit of Steinke, Nasr & Jagielski (2023). The lower bound must not exceed epsilon."), "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in audit.items()]
    return "\n".join(lines) + "\n"
