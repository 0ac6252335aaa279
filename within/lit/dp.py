"""privacy=dp: DP-SGD (Abadi et al., 2016) through Opacus inside Lightning.

`configure_privacy(cfg, module, datamodule)` checks the config, turns on Poisson sampling,
derives the noise multiplier from the target epsilon, and returns a `DPAdScoreModule` (the
same net and optimizer factory) plus a `DPTrainingValidator`. The shape follows Opacus'
examples/mnist_lightning.py: the private model/optimizer are made in `configure_optimizers`.

Why manual optimization: ghost clipping's loss is a two-pass object, not a Tensor, and
virtual steps (Opacus' BatchSplittingSampler protocol) decide per physical chunk whether the
optimizer really steps. Lightning's own gradient accumulation and clipping are refused: they
would act on already-noised, already-clipped gradients and break the accounting.

The privacy unit is one row of the training frame (one impression, or one aggregated
impression group when the data has `weight`).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from within.lit.module import AdScoreModule
from within.privacy.audit import draw_canaries
from within.privacy.engine import (
    ACCOUNTANTS,
    DP_PRECISIONS,
    GRAD_SAMPLE_MODES,
    PrivacyConfigError,
    PrivateTraining,
    default_delta,
    is_finite_positive,
    make_private,
    noise_for_target,
    steps_per_epoch,
    zero_per_sample_grads,
)
from within.privacy.validator import AUDIT_DEFAULTS, DPTrainingValidator

log = logging.getLogger(__name__)

PRIVACY_KEYS = {
    "enabled", "target_epsilon", "target_delta", "max_grad_norm", "noise_multiplier", "accountant",
    "grad_sample_mode", "poisson_sampling", "secure_mode", "max_physical_batch_size", "audit", "lr", "lr_decay",
}
ROW_ID = "row_id"  # added to the train split so held-out audit canaries can be dropped from batches


def row_losses(logits: torch.Tensor, clicks: torch.Tensor, impressions: torch.Tensor) -> torch.Tensor:
    """Per-row binomial log loss (the summand of `binomial_logloss`): the DP per-sample loss."""
    rate = (clicks / impressions).clamp(0.0, 1.0)
    return F.binary_cross_entropy_with_logits(logits, rate, reduction="none") * impressions


class RowLoss(nn.Module):
    """`row_losses` as a criterion with a `reduction` attribute, as Opacus' ghost-clipping loss wrapper needs."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, clicks: torch.Tensor, impressions: torch.Tensor) -> torch.Tensor:
        per = row_losses(logits, clicks, impressions)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


class DPDDPStrategy(DDPStrategy):
    """DDP whose model wrapper is Opacus' DPDDP (broadcast at start, no gradient hooks).

    Torch DDP would all-reduce raw gradients during backward (and break ghost clipping's second
    backward); under DP the distributed DPOptimizer all-reduces the clipped, noised sum instead.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        return DPDDP(model)


class DPAdScoreModule(AdScoreModule):
    """AdScoreModule trained with DP-SGD: per-row clipping to `max_grad_norm`, Gaussian noise
    `noise_multiplier * max_grad_norm` on the summed batch gradient, Poisson batches, accounting.

    `max_physical_batch_size` splits each logical (Poisson) batch into chunks; the optimizer
    steps once per logical batch (Opacus BatchMemoryManager virtual steps).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Any,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        compile: bool = False,
        noise_multiplier: float = 1.0,
        max_grad_norm: float = 1.0,
        target_delta: float = 1e-5,
        accountant: str = "prv",
        grad_sample_mode: str = "ghost",
        secure_mode: bool = False,
        max_physical_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if compile:
            raise PrivacyConfigError(
                "model.compile=true is not supported with privacy=dp: Opacus' per-sample gradient hooks do not "
                "run inside torch.compile graphs. Set model.compile=false"
            )
        if max_physical_batch_size is not None and int(max_physical_batch_size) < 1:
            raise PrivacyConfigError(
                f"privacy.max_physical_batch_size={max_physical_batch_size}: must be >= 1, or null for no splitting"
            )
        super().__init__(net, optimizer, scheduler, scheduler_interval, compile=False)
        self.automatic_optimization = False
        self.criterion = RowLoss()
        self.privacy: PrivateTraining | None = None
        self.canaries: tuple[np.ndarray, np.ndarray] | None = None
        self.n_train: int | None = None
        self.steps_per_epoch: int | None = None
        self._excluded: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None

    # ---- audit canaries -------------------------------------------------------------------------
    def set_canaries(self, rows: np.ndarray, included: np.ndarray, n_train: int) -> None:
        """Audit canaries (train row indices) and which of them train; the rest are dropped from batches."""
        excluded = torch.zeros(n_train, dtype=torch.bool)
        excluded[torch.as_tensor(rows[~included], dtype=torch.long)] = True
        self.canaries = (np.asarray(rows), np.asarray(included, bool))
        self._excluded = excluded

    # ---- private objects ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        trainer = self.trainer
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "poisson_sampling", False):
            raise PrivacyConfigError(
                "data: DPAdScoreModule needs a datamodule with poisson_sampling=True (configure_privacy sets it)"
            )
        q, n = float(dm.sample_rate), int(dm.n_train)
        self.n_train, self.steps_per_epoch = n, steps_per_epoch(q)
        world = int(trainer.world_size)
        base = self.optimizer_factory(params=[p for p in self.net.parameters() if p.requires_grad])
        probe_batch = self._strip(dm.datasets["train"][np.arange(min(4, n))])
        probe_batch = {k: v.to(self.device) for k, v in probe_batch.items()}

        def probe(model: nn.Module) -> torch.Tensor:
            return row_losses(model(probe_batch).float(), probe_batch["label"], probe_batch["weight"])

        hp = self.hparams
        self.privacy = make_private(
            self.net, base, dm.train_dataloader(), noise_multiplier=hp.noise_multiplier,
            max_grad_norm=hp.max_grad_norm, sample_rate=q, expected_batch_size=q * n / world, delta=hp.target_delta,
            accountant=hp.accountant, grad_sample_mode=hp.grad_sample_mode, criterion=self.criterion, probe=probe,
            secure_mode=hp.secure_mode, world_size=world,
        )
        if self._restored is not None:
            self.privacy.history = self._restored["history"]
        if self.scheduler_factory is None:
            return self.privacy.optimizer
        scheduler = self.scheduler_factory(optimizer=self.privacy.optimizer)  # DPOptimizer shares param_groups
        return {"optimizer": self.privacy.optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": hp.scheduler_interval}}

    def on_train_start(self) -> None:
        """Give each rank its own Poisson stream (the datamodule seeds every rank alike, which would
        make rows on different ranks join batches together) and a fresh one after a resume."""
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if sampler is None or not hasattr(sampler, "generator"):
            return
        if self.privacy is not None and self.privacy.secure_mode:
            sampler.generator = self.privacy.engine.secure_rng
            return
        seq = np.random.SeedSequence([int(self.hparams.seed), int(self.global_rank), int(self.trainer.current_epoch),
                                      int(self.trainer.global_step)])
        sampler.generator = torch.Generator().manual_seed(int(seq.generate_state(1)[0]))

    # ---- steps --------------------------------------------------------------------------------
    @staticmethod
    def _strip(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != ROW_ID}

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Row losses of `batch` under the current weights (used by the membership audit)."""
        batch = self._strip(batch)
        return row_losses(self(batch).float(), batch["label"], batch["weight"])

    def _validator(self) -> DPTrainingValidator | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, DPTrainingValidator)), None)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        pt = self.privacy
        limit = pt.extras.get("step_limit")
        if limit is not None and pt.steps >= limit:
            # hard budget cap: this batch is never touched, so it costs no privacy
            validator = self._validator()
            if validator is not None and not validator.stopped_for_budget:
                validator.stop_for_budget(self.trainer, f"step {pt.steps} reached the budget's step limit {limit}")
            self.trainer.should_stop = True
            return None
        rows = batch.get(ROW_ID)
        batch = self._strip(batch)
        if rows is not None and self._excluded is not None:
            keep = ~self._excluded.to(rows.device)[rows]
            batch = {k: v[keep] for k, v in batch.items()}
        n = int(batch["label"].shape[0])
        opt = self.optimizers()
        dp_opt = pt.optimizer
        size = self.hparams.max_physical_batch_size
        if size:
            from opacus.utils.batch_memory_manager import BatchSplittingSampler

            # Opacus' own splitter: queues "skip" on the optimizer for every chunk but the last
            chunks = list(BatchSplittingSampler(sampler=[np.arange(n)], max_batch_size=int(size), optimizer=dp_opt))
        else:
            chunks = [None]
        loss_sum = batch["label"].new_zeros(())
        for i, idx in enumerate(chunks):
            sub = batch if idx is None else {k: v[torch.as_tensor(idx, dtype=torch.long)] for k, v in batch.items()}
            loss_sum = loss_sum + self._backward(sub)
            if i == len(chunks) - 1:
                opt.step()  # clip, noise, account, step (counted by Lightning)
            else:
                dp_opt.step()  # virtual step: clip and accumulate only
            dp_opt.zero_grad()
        impressions = batch["weight"].sum()
        if n:
            self.split_loss["train_loss"].update(loss_sum / impressions, weight=impressions)
        self.log("train/loss", self.split_loss["train_loss"], on_step=False, on_epoch=True, prog_bar=True)
        if self.scheduler_factory is not None and self.hparams.scheduler_interval == "step":
            self.lr_schedulers().step()
        return loss_sum.detach()

    def _backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backward of one physical chunk; returns the chunk's summed row loss (detached)."""
        pt = self.privacy
        if batch["label"].shape[0] == 0:
            zero_per_sample_grads(pt, list(self.net.parameters()))
            return batch["label"].new_zeros(())
        logits = self.net(batch).float()
        if pt.criterion is not None:  # ghost clipping: two backward passes inside .backward()
            loss = pt.criterion(logits, batch["label"], batch["weight"])
            loss.backward()
            return loss.loss_per_sample.detach().sum()
        per = row_losses(logits, batch["label"], batch["weight"])
        self.manual_backward(per.mean())
        return per.detach().sum()

    def on_train_epoch_end(self) -> None:
        if self.scheduler_factory is not None and self.hparams.scheduler_interval == "epoch":
            self.lr_schedulers().step()

    def on_fit_end(self) -> None:
        # the bundle and export get a plain network, without Opacus' hooks
        if self.privacy is not None:
            self.privacy.close()

    # ---- checkpoint: the accountant's history must survive a resume ------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pt = self.privacy
        history = pt.history if pt is not None else (self._restored or {}).get("history", [])
        checkpoint["privacy_accountant"] = {
            "mechanism": pt.accountant if pt is not None else str(self.hparams.accountant),
            "history": [[float(s), float(q), int(n)] for s, q, n in history],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("privacy_accountant")
        if state is None:
            raise PrivacyConfigError(
                "ckpt_path: this checkpoint holds no privacy accountant state (it was not trained with privacy=dp); "
                "resuming it under DP would under-report epsilon. Start a fresh run"
            )
        self._restored = {"mechanism": state["mechanism"], "history": [tuple(h) for h in state["history"]]}
        if self.privacy is not None:
            self.privacy.history = self._restored["history"]


# ---- pipeline hooks ----------------------------------------------------------------------------
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
            cfg.trainer.strategy = {"_target_": "within.lit.dp.DPDDPStrategy"}
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


def privacy_report(module: L.LightningModule, trainer: L.Trainer, report_dir: str | Path) -> dict[str, Any]:
    """Write report/privacy.{json,md} and return the dict that goes into the bundle metadata."""
    validator = next((c for c in trainer.callbacks if isinstance(c, DPTrainingValidator)), None)
    if validator is None:
        raise PrivacyConfigError("privacy=dp: no DPTrainingValidator among the trainer callbacks")
    if validator._private is None:
        validator._private = getattr(module, "privacy", None)
    return validator.generate_privacy_report(report_dir)
