"""DPAdScoreModule: AdScoreModule trained with DP-SGD (Abadi et al., 2016) through Opacus.

The shape follows Opacus' examples/mnist_lightning.py: the private model/optimizer are made in
`configure_optimizers`. Why manual optimization: ghost clipping's loss is a two-pass object, not a
Tensor, and virtual steps (Opacus' BatchSplittingSampler protocol) decide per physical chunk whether
the optimizer really steps. Lightning's own gradient accumulation and clipping are refused (by
within/pipeline/privacy.py): they would act on already-noised, already-clipped gradients and break
the accounting.

The privacy unit is one row of the training frame (one impression, or one aggregated impression
group when the data has `weight`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from within.lit.losses import RowLoss, row_losses
from within.lit.module import AdScoreModule
from within.privacy.engine import (
    PrivacyConfigError,
    PrivateTraining,
    make_private,
    steps_per_epoch,
    zero_per_sample_grads,
)
from within.privacy.validator import DPTrainingValidator

ROW_ID = "row_id"  # added to the train split so held-out audit canaries can be dropped from batches


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
        self.log_train_loss()
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
