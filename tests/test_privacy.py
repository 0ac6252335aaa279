"""privacy=dp: Opacus wiring, DPTrainingValidator refusals, accounting, resume, audits."""
from __future__ import annotations

import functools
import math
import subprocess
import sys

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from within.data.datamodule import AdDataModule
from within.lit.dp_module import DPAdScoreModule
from within.lit.module import AdScoreModule
from within.nn.predictor import AdPredictorNN
from within.pipeline.privacy import check_trainer, configure_privacy
from within.privacy.audit import draw_canaries, epsilon_lower_bound, membership_auc, one_run_lower_bound
from within.privacy.engine import (
    PrivacyConfigError,
    epsilon_of,
    make_private,
    noise_for_target,
    resolve_grad_sample_mode,
    zero_per_sample_grads,
)
from within.privacy.validator import DPTrainingValidator

from .conftest import CONF, FAST, ROOT, compose_cfg

SPEC = {"label": "clicked", "weight": None, "time": None, "truth": None,
        "fields": [{"name": "x1", "type": "numeric"}, {"name": "x2", "type": "numeric"},
                   {"name": "c", "type": "categorical"}]}


def frame(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "c": rng.choice(list("abcde"), n)})
    logit = 2.0 * df.x1 - 1.5 * df.x2 + (df.c == "a") * 1.0 - 0.5
    df["clicked"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return df


def datamodule(n: int = 2000, batch_size: int = 200) -> AdDataModule:
    dm = AdDataModule(frame(n), features=SPEC, split={"method": "random", "val_frac": 0.1, "test_frac": 0.2},
                      batch_size=batch_size, seed=0)
    dm.setup("fit")
    return dm


def base_cfg(tmp_path, **privacy) -> OmegaConf:
    p = OmegaConf.to_container(OmegaConf.load(CONF / "privacy" / "dp.yaml"))["privacy"]  # @package _global_
    p["audit"].update(canaries=200, mia_samples=400, bootstrap=50)
    p.update(privacy)
    return OmegaConf.create({
        "seed": 0, "privacy": p, "paths": {"output_dir": str(tmp_path)},
        "trainer": {"max_epochs": 2, "accumulate_grad_batches": 1, "gradient_clip_val": None,
                    "precision": "32-true", "strategy": "auto", "devices": 1},
    })


def plain_module(dm: AdDataModule, lr: float = 0.02) -> AdScoreModule:
    net = AdPredictorNN(dm.processor.input_dim, hidden_dims=[16], dp_compatible=True, use_cross_modal=False)
    return AdScoreModule(net, functools.partial(torch.optim.Adam, lr=lr))


def fit_dp(tmp_path, max_epochs: int = 2, ckpt_path=None, dm=None, **privacy):
    L.seed_everything(0)
    dm = dm or datamodule()
    cfg = base_cfg(tmp_path, **privacy)
    cfg.trainer.max_epochs = max_epochs
    module, callbacks = configure_privacy(cfg, plain_module(dm), dm)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, callbacks=[*callbacks, ckpt], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer, callbacks[0], dm


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """One short DP run (ghost clipping, target epsilon 3) shared by several tests."""
    tmp = tmp_path_factory.mktemp("dp")
    module, trainer, validator, dm = fit_dp(tmp, max_epochs=2, target_epsilon=3.0)
    report = validator.generate_privacy_report(tmp / "report")
    return module, trainer, validator, report, tmp


# ---- a DP run really clips, noises and accounts -----------------------------------------------------
def test_dp_run_reports_epsilon_within_target_recomputable(dp_run):
    _, trainer, _, report, tmp = dp_run
    assert (tmp / "report" / "privacy.json").is_file() and (tmp / "report" / "privacy.md").is_file()
    assert 0 < report["epsilon"] <= 3.0
    assert report["steps"] == 2 * int(1 / report["sample_rate"])
    assert report["grad_sample_mode"] == "ghost"
    for cls, key in ((PRVAccountant, "epsilon_prv"), (RDPAccountant, "epsilon_rdp")):
        acc = cls()
        acc.history = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
        assert acc.get_epsilon(delta=report["delta"]) == pytest.approx(report[key], rel=1e-9)
    assert float(trainer.callback_metrics["privacy/epsilon"]) == pytest.approx(report["epsilon"], rel=1e-6)


def test_private_step_clips_per_sample_and_adds_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(32, 5) * 100, torch.randn(32)  # huge inputs: every row's gradient is clipped
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    def grad_after(noise: float) -> torch.Tensor:
        m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
        m.load_state_dict(model.state_dict())
        pt = make_private(m, torch.optim.SGD(m.parameters(), lr=0.0), loader, noise_multiplier=noise,
                          max_grad_norm=0.01, sample_rate=1.0, expected_batch_size=32, delta=1e-5,
                          grad_sample_mode="hooks")
        ((m(x).squeeze(-1) - y) ** 2).mean().backward()
        assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 32 for p in m.parameters())
        pt.optimizer.step()
        assert pt.steps == 1
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    clipped = grad_after(1e-12)
    raw = torch.cat([g.flatten() for g in _raw_grads(model, x, y)])
    assert clipped.norm() <= 0.01 * (1 + 1e-4)  # mean of 32 rows each clipped to 0.01
    assert raw.norm() > 10 * clipped.norm()
    noisy = grad_after(100.0)
    assert (noisy - clipped).norm() > 10 * clipped.norm()


def _raw_grads(model, x, y):
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    m.load_state_dict(model.state_dict())
    ((m(x).squeeze(-1) - y) ** 2).mean().backward()
    return [p.grad for p in m.parameters()]


def test_virtual_steps_equal_one_logical_step():
    torch.manual_seed(0)
    x, y = torch.randn(24, 4), torch.randn(24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)
    grads = []
    for chunks in (1, 3):
        m = nn.Linear(4, 1)
        nn.init.constant_(m.weight, 0.3)
        nn.init.constant_(m.bias, -0.2)
        pt = make_private(m, torch.optim.SGD(m.parameters(), lr=0.0), loader, noise_multiplier=1e-12,
                          max_grad_norm=0.5, sample_rate=1.0, expected_batch_size=24, delta=1e-5,
                          grad_sample_mode="hooks")
        from opacus.utils.batch_memory_manager import BatchSplittingSampler

        for idx in BatchSplittingSampler(sampler=[np.arange(24)], max_batch_size=24 // chunks, optimizer=pt.optimizer):
            ((m(x[idx]).squeeze(-1) - y[idx]) ** 2).mean().backward()
            pt.optimizer.step()
            if chunks == 1 or idx[-1] == 23:
                grads.append(m.weight.grad.clone())
            pt.optimizer.zero_grad()
        assert pt.steps == 1  # one accounted step per logical batch
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_empty_poisson_batch_still_noises_and_counts():
    m = nn.Linear(3, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3)), batch_size=4)
    for mode in ("hooks", "ghost"):
        crit = nn.MSELoss()
        pt = make_private(m, torch.optim.SGD(m.parameters(), lr=0.0), loader, noise_multiplier=1.0,
                          max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=2, delta=1e-5,
                          grad_sample_mode=mode, criterion=crit)
        zero_per_sample_grads(pt, list(m.parameters()))
        pt.optimizer.step()
        assert pt.steps == 1 and pt.history == [(1.0, 0.5, 1)]
        assert m.weight.grad.abs().sum() > 0  # pure noise
        pt.optimizer.zero_grad()
        pt.close()


def test_ghost_falls_back_to_hooks_when_a_layer_runs_twice(caplog):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x)).sum(-1)

    mode, reason = resolve_grad_sample_mode(Tied(), "ghost", probe=lambda m: m(torch.randn(3, 4)))
    assert mode == "hooks" and "tying" in reason.lower()
    assert "falling back to hooks" in caplog.text
    assert resolve_grad_sample_mode(nn.Linear(4, 1), "ghost", probe=lambda m: m(torch.randn(3, 4)))[0] == "ghost"


def test_poisson_sampler_is_bernoulli_per_row():
    dm = datamodule(n=3000, batch_size=300)
    dm.poisson_sampling = True
    loader = dm.train_dataloader()
    n, q = dm.n_train, dm.sample_rate
    counts, sizes = np.zeros(n), []
    for _ in range(20):
        for idx in loader.sampler:
            counts[idx] += 1
            sizes.append(len(idx))
    sizes = np.asarray(sizes)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / len(sizes))
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.35)  # binomial, not a fixed batch size
    assert abs(counts.mean() / len(sizes) - q) < 0.01


def test_distributed_poisson_sampler_keeps_empty_batches_and_partitions_rows():
    from within.privacy.sampling import DistributedPoissonSampler

    n, q, world = 1001, 0.002, 2  # E[local batch] = 1: empty local batches are common
    samplers = [DistributedPoissonSampler(total_size=n, sample_rate=q, num_replicas=world, rank=r, shuffle_seed=3,
                                          generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    shards = [set(s.shard().tolist()) for s in samplers]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(n))
    counts, sizes = np.zeros(n), []
    for epoch in range(40):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        # every rank takes floor(1/q) steps, empty ones included: the DDP all-reduces stay paired
        assert [len(b) for b in per_rank] == [int(1 / q)] * world
        assert any(len(b) == 0 for b in per_rank[0])
        for step in zip(*per_rank):
            idx = torch.cat(list(step)).numpy()
            counts[idx] += 1
            sizes.append(len(idx))
    # the GLOBAL batch is Poisson at rate q: mean q * N, each row joins with probability q
    sizes = np.asarray(sizes)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q / len(sizes))
    assert abs(counts.mean() / len(sizes) - q) < 0.1 * q


# One rank of a 2-process gloo job (run as `python -c`, so a rank imports torch + within.privacy only):
# a private step on this rank's half of a fixed global batch, for each grad_sample_mode and noise level.
_DDP_NOISE_WORKER = r"""
import sys
import torch
import torch.distributed as dist
from torch import nn
from within.privacy.engine import make_private

rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
d, b = 4000, 64  # global batch of 64 rows, 32 per rank
x, y = torch.randn(b, d, generator=g), torch.randn(b, generator=g)
mine = slice(rank * b // world, (rank + 1) * b // world)
torch.manual_seed(100 + rank)  # noise streams differ per rank, as they would in practice
results = {}
for mode in ("hooks", "ghost"):
    for sigma in (0.0, 5.0):
        m = nn.Linear(d, 1, bias=False)
        nn.init.constant_(m.weight, 0.01)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[mine]), batch_size=b // world)
        crit = nn.MSELoss()
        pt = make_private(m, torch.optim.SGD(m.parameters(), lr=0.0), loader, noise_multiplier=sigma,
                          max_grad_norm=0.5, sample_rate=0.5, expected_batch_size=b / world, delta=1e-5,
                          grad_sample_mode=mode, criterion=crit if mode == "ghost" else None, world_size=world)
        out = m(x[mine]).squeeze(-1)
        if pt.criterion is not None:
            pt.criterion(out, y[mine]).backward()
        else:
            crit(out, y[mine]).backward()
        pt.optimizer.step()
        results[f"{mode}/{sigma}"] = m.weight.grad.detach().clone().flatten()
        results[f"{mode}/{sigma}/steps"] = torch.tensor(pt.steps)
        results[f"{mode}/{sigma}/optimizer"] = torch.tensor(int(type(pt.optimizer).__name__.startswith("Distributed")))
        pt.close()
torch.save(results, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_distributed_dp_step_noises_once_over_the_global_batch(tmp_path):
    """Two gloo processes with Opacus' distributed DP optimizer (hooks and ghost): the step equals
    (sum of every rank's clipped rows + ONE N(0, (sigma C)^2) draw) / global expected batch, on both
    ranks. Noise added on every rank would show a std sqrt(2) times larger."""
    world = 2
    procs = [subprocess.Popen([sys.executable, "-c", _DDP_NOISE_WORKER, str(r), str(world), str(tmp_path / "init"),
                               str(tmp_path)], cwd=ROOT) for r in range(world)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world))
    # reference: per-row gradients of the global batch, clipped to C, summed, divided by the global batch
    g = torch.Generator().manual_seed(0)
    d, b, c = 4000, 64, 0.5
    x, y = torch.randn(b, d, generator=g), torch.randn(b, generator=g)
    w = torch.full((d,), 0.01)
    per_row = 2 * ((x @ w) - y)[:, None] * x  # d/dw of (x.w - y)^2
    clipped = per_row * (c / per_row.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)[:, None]
    expected = clipped.sum(0) / b
    for mode in ("hooks", "ghost"):
        for sigma in (0.0, 5.0):
            key = f"{mode}/{sigma}"
            torch.testing.assert_close(r0[key], r1[key])  # both ranks step with the same gradient
            assert int(r0[f"{key}/steps"]) == int(r1[f"{key}/steps"]) == 1
            assert int(r0[f"{key}/optimizer"]) == 1  # Opacus' Distributed*DPOptimizer*
        torch.testing.assert_close(r0[f"{mode}/0.0"], expected, rtol=1e-4, atol=1e-6)
        noise = (r0[f"{mode}/5.0"] - expected) * b  # the noise on the summed gradient
        assert noise.std().item() == pytest.approx(5.0 * c, rel=0.06), mode  # sigma * C once, not sqrt(2) times


# ---- refusals --------------------------------------------------------------------------------------
def validator(**kw) -> DPTrainingValidator:
    args = {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.0, **kw}
    return DPTrainingValidator(**args)


OK_PARAMS = {"n_train": 10_000, "sample_rate": 0.01, "planned_steps": 100, "poisson_sampling": True}


@pytest.mark.parametrize("kw,params,match", [
    ({"delta": 1e-3}, {}, r"privacy.target_delta=0.001 must be in \(0, 1/N_train\)"),
    ({"max_grad_norm": None}, {}, r"privacy.max_grad_norm=None"),
    ({"max_grad_norm": float("inf")}, {}, r"privacy.max_grad_norm=inf"),
    ({"noise_multiplier": 0.0}, {}, r"privacy.noise_multiplier=0.0.*epsilon = infinity"),
    ({}, {"poisson_sampling": False}, r"privacy.poisson_sampling=false"),
    ({"noise_multiplier": 0.5, "accountant": "rdp"}, {"planned_steps": 5000},
     r"trainer.max_epochs: the planned 5000 steps.*> privacy.target_epsilon=3.0"),
])
def test_validator_refuses_non_private_settings(kw, params, match):
    with pytest.raises(PrivacyConfigError, match=match):
        validator(**kw).validate_training_params({**OK_PARAMS, **params})
    validator().validate_training_params(OK_PARAMS)  # the baseline passes


def test_validator_refuses_batchnorm_and_unwrapped_model_and_optimizer():
    v = validator()
    with pytest.raises(PrivacyConfigError, match=r"model.net has BatchNorm layers \['1'\]"):
        v.audit_model(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    m = nn.Linear(3, 1)
    with pytest.raises(PrivacyConfigError, match="not wrapped for per-sample gradients"):
        v.audit_model(m)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3)), batch_size=2)
    pt = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), loader, noise_multiplier=1.0, max_grad_norm=1.0,
                      sample_rate=0.5, expected_batch_size=2, delta=1e-5, grad_sample_mode="hooks")
    res = v.audit_model(m, pt.optimizer, pt.hooks)
    assert res["structure_checks"] == ["no BatchNorm", "Opacus ModuleValidator", "per-sample gradient hooks",
                                       "DPOptimizer"] and res["leakage_audit"] == "not run"
    with pytest.raises(PrivacyConfigError, match="plain SGD, not an Opacus DPOptimizer"):
        v.audit_model(m, torch.optim.SGD(m.parameters(), lr=0.1), pt.hooks)


def test_budget_and_report_before_any_training_run(tmp_path):
    v = validator()
    with pytest.raises(PrivacyConfigError, match="no training run is attached and no settings were validated"):
        v.track_privacy_budget(10)
    v.validate_training_params(OK_PARAMS)
    now = v.track_privacy_budget(0)
    later = v.track_privacy_budget(100)
    assert now["epsilon"] == 0.0 and now["steps"] == 0
    assert later["projected_epsilon"] == pytest.approx(epsilon_of([(1.0, 0.01, 100)], 1e-5, "prv"), rel=1e-9)
    assert later["projected_steps"] == 100 and later["within_budget"]
    report = v.generate_privacy_report(tmp_path)
    assert report["status"] == "planned" and report["steps"] == OK_PARAMS["planned_steps"]
    assert report["epsilon"] == pytest.approx(later["projected_epsilon"], rel=1e-9)
    assert "if training takes the planned 100 steps" in (tmp_path / "privacy.md").read_text()
    with pytest.raises(ValueError, match="steps must be >= 0"):
        v.track_privacy_budget(-1)


def test_audit_model_reports_or_runs_the_leakage_audit(dp_run):
    module, trainer, fitted, _, _ = dp_run
    res = fitted.audit_model(module)  # the validator that watched the fit: the audit already ran
    assert res["leakage_audit"] == "reported" and res["structure_checks"][-1] == "DPOptimizer"
    assert res["audit/mia_auc"] == fitted.audit_results["audit/mia_auc"]
    fresh = validator(delta=fitted.delta, audit={"canaries": 200, "mia_samples": 400, "bootstrap": 50})
    res = fresh.audit_model(module)
    assert res["leakage_audit"] == "not run" and "datamodule=" in res["leakage_note"]
    res = fresh.audit_model(module, datamodule=trainer.datamodule)
    assert res["leakage_audit"] == "ran" and res["audit/mia_n_members"] == 400
    assert res["audit/mia_auc_low"] <= res["audit/mia_auc"] <= res["audit/mia_auc_high"]
    assert fresh.audit_model(module)["leakage_audit"] == "reported"  # now it has run
    assert fresh.generate_privacy_report()["audit/mia_auc"] == res["audit/mia_auc"]


def test_validator_refuses_a_non_poisson_loader():
    dm = datamodule()
    with pytest.raises(PrivacyConfigError, match="samples with BatchIndexSampler, not Poisson"):
        validator().check_sampler(dm.train_dataloader(), dm.sample_rate)
    dm.poisson_sampling = True
    validator().check_sampler(dm.train_dataloader(), dm.sample_rate)


@pytest.mark.parametrize("key,value,match", [
    ("accumulate_grad_batches", 4, r"trainer.accumulate_grad_batches=4 is not allowed with privacy=dp"),
    ("precision", "bf16-mixed", r"trainer.precision=bf16-mixed is not supported with privacy=dp"),
    ("precision", "16-mixed", r"trainer.precision=16-mixed"),
    ("gradient_clip_val", 1.0, r"trainer.gradient_clip_val=1.0 is not allowed"),
    ("strategy", "fsdp", r"trainer.strategy=fsdp is not supported"),
])
def test_trainer_settings_refused(tmp_path, key, value, match):
    cfg = base_cfg(tmp_path)
    cfg.trainer[key] = value
    with pytest.raises(PrivacyConfigError, match=match):
        check_trainer(cfg)


def test_configure_privacy_refuses_before_training(tmp_path):
    dm = datamodule()
    with pytest.raises(PrivacyConfigError, match=r"privacy.target_delta=0.01"):
        configure_privacy(base_cfg(tmp_path, target_delta=0.01), plain_module(dm), dm)
    with pytest.raises(PrivacyConfigError, match="privacy.noise_multiplier=0"):
        configure_privacy(base_cfg(tmp_path, noise_multiplier=0, target_epsilon=None), plain_module(dm), dm)
    with pytest.raises(PrivacyConfigError, match="privacy.poisson_sampling=false"):
        configure_privacy(base_cfg(tmp_path, poisson_sampling=False), plain_module(dm), dm)
    with pytest.raises(PrivacyConfigError, match="privacy.max_grad_nrom: unknown setting; did you mean 'max_grad_norm'"):
        configure_privacy(base_cfg(tmp_path, max_grad_nrom=1.0), plain_module(dm), dm)
    module, (v,) = configure_privacy(base_cfg(tmp_path), plain_module(dm), dm)
    assert dm.poisson_sampling and isinstance(module, DPAdScoreModule)
    assert v.delta == pytest.approx(1 / (10 * dm.n_train))
    planned = [(v.noise_multiplier, dm.sample_rate, 2 * int(1 / dm.sample_rate))]
    eps = {mech: epsilon_of(planned, v.delta, mech) for mech in ("prv", "rdp")}
    # the noise meets the target under both accountants (RDP is the looser one: it sets the noise)
    assert eps["prv"] <= eps["rdp"] <= 3.0 and eps["rdp"] >= 2.95


def test_privacy_lr_sets_the_dp_optimizer_learning_rate(tmp_path):
    dm = datamodule()
    module, _ = configure_privacy(base_cfg(tmp_path, lr=0.05), plain_module(dm, lr=0.02), dm)
    assert module.optimizer_factory(params=[nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 0.05
    module, _ = configure_privacy(base_cfg(tmp_path, lr=None), plain_module(dm, lr=0.02), dm)
    assert module.optimizer_factory(params=[nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 0.02
    with pytest.raises(PrivacyConfigError, match=r"privacy.lr=-1"):
        configure_privacy(base_cfg(tmp_path, lr=-1), plain_module(dm), dm)


def test_noise_for_target_meets_target_with_both_accountants():
    for mech in ("prv", "rdp"):
        sigma = noise_for_target(2.0, 1e-5, 0.02, 300, mech)
        eps = epsilon_of([(sigma, 0.02, 300)], 1e-5, mech)
        assert 1.9 <= eps <= 2.0


# ---- budget, resume -----------------------------------------------------------------------------
class _LowerBudget(L.Callback):
    """Lowers the step cap after the validator set it, as if the budget were nearly spent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.privacy.extras["step_limit"] = self.limit


def test_training_stops_at_the_budget_with_a_checkpoint(tmp_path):
    dm = datamodule()
    cfg = base_cfg(tmp_path)
    module, callbacks = configure_privacy(cfg, plain_module(dm), dm)
    trainer = L.Trainer(max_epochs=2, logger=False, callbacks=[*callbacks, _LowerBudget(3)], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert module.privacy.steps == 3 and trainer.global_step == 3
    assert callbacks[0].stopped_for_budget
    state = torch.load(tmp_path / "checkpoints" / "privacy_budget_stop.ckpt", weights_only=True)
    assert sum(h[2] for h in state["privacy_accountant"]["history"]) == 3


def test_resume_restores_accountant_history(dp_run, tmp_path):
    module, _, _, report, tmp = dp_run
    last = tmp / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)  # plain lists: no pickled objects
    assert state["privacy_accountant"]["history"] == [[report["noise_multiplier"], report["sample_rate"],
                                                      report["steps"]]]
    # resume with one more epoch (noise fixed to the first run's, budget raised to fit it)
    resumed, _, v2, _ = fit_dp(tmp_path, max_epochs=3, ckpt_path=str(last), noise_multiplier=report["noise_multiplier"],
                               target_epsilon=10.0)
    assert resumed.privacy.steps == report["steps"] * 3 // 2
    assert resumed.privacy.epsilon() > report["epsilon"]


# ---- audits ---------------------------------------------------------------------------------------
def test_audit_finds_leakage_in_an_overfit_non_private_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 400
    x = torch.as_tensor(rng.normal(size=(2 * n, 20)), dtype=torch.float32)
    y = torch.as_tensor(rng.random(2 * n) < 0.5, dtype=torch.float32)  # random labels: only memory helps
    rows, included = draw_canaries(n, n, seed=1)
    train = np.concatenate([rows[included]])
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x[train]).squeeze(-1), y[train]).backward()
        opt.step()
    with torch.no_grad():
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none").numpy()
    mia = membership_auc(loss[train], loss[n:], n_boot=100)
    assert mia["auc"] > 0.8 and mia["auc_low"] > 0.7
    bound = one_run_lower_bound(-loss[rows], included)
    assert bound["epsilon_lower_bound"] > 1.0 and bound["canary_auc"] > 0.8


def test_audit_sees_no_leakage_in_a_strongly_private_run(tmp_path):
    module, trainer, v, _ = fit_dp(tmp_path, max_epochs=1, noise_multiplier=1e4, target_epsilon=None)
    report = v.generate_privacy_report()
    assert report["audit/mia_auc_low"] <= 0.5 <= report["audit/mia_auc_high"] + 0.02
    assert report["audit/epsilon_lower_bound"] <= report["epsilon"]
    assert abs(float(trainer.callback_metrics["val/auc"]) - 0.5) < 0.2  # huge noise: no utility either


def test_epsilon_lower_bound_is_monotone_and_zero_at_chance():
    assert epsilon_lower_bound(50, 100, 0.05) == 0.0
    assert 0 < epsilon_lower_bound(80, 100, 0.05) < epsilon_lower_bound(95, 100, 0.05)
    # 100/100 correct: P[Bin(100, p) = 100] = p^100 <= 0.05 -> eps = logit(0.05^(1/100))
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 0.05) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)


def test_dp_run_keeps_utility(dp_run):
    _, trainer, _, report, _ = dp_run
    assert float(trainer.callback_metrics["val/auc"]) > 0.75
    assert report["audit/epsilon_lower_bound"] <= report["epsilon"]


# ---- the Hydra pipeline --------------------------------------------------------------------------
def _needs_simulator():
    if not (CONF / "data" / "synthetic.yaml").is_file():
        pytest.fail("conf/data/synthetic.yaml is missing: the default simulator config is required")


@pytest.mark.slow  # ~70 s on a 2-core CI box
def test_pipeline_privacy_dp_end_to_end(tmp_path):
    _needs_simulator()
    import json

    from within.pipeline.train import run_train

    cfg = compose_cfg("train", [*FAST, "privacy=dp", "privacy.target_epsilon=3", "privacy.audit.canaries=300",
                                "privacy.audit.bootstrap=50", "trainer.max_epochs=2", "logger=csv"], tmp_path)
    run_train(cfg)
    report = json.loads((tmp_path / "report" / "privacy.json").read_text())
    assert 0 < report["epsilon"] <= 3.0
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in report["history"]]
    assert acc.get_epsilon(report["delta"]) == pytest.approx(report["epsilon_rdp"], rel=1e-9)
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert meta["metadata"]["privacy"]["epsilon"] == pytest.approx(report["epsilon"])


@pytest.mark.slow
def test_ddp_cpu_two_processes_dp(tmp_path):
    """trainer=ddp_cpu (2 gloo processes) under privacy=dp finishes, and accounts the GLOBAL batch:
    q = data.batch_size / N_train (each rank samples its shard at rate q), floor(1/q) steps per epoch."""
    _needs_simulator()
    import json
    import os
    import signal

    batch = 512
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", "privacy=dp", "data.source.n=6000",
           f"data.batch_size={batch}", "trainer.max_epochs=2", "extras.print_config=false",
           "privacy.audit.canaries=200",
           f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"]
    # own session: on a timeout the whole group (rank 0 and the rank it launched) is killed, no stray workers
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("privacy=dp with trainer=ddp_cpu did not finish in 600 s (DDP collective mismatch?)")
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "report" / "privacy.json").read_text())
    n_train = report["n_train"]
    assert report["world_size"] == 2 and 0 < report["epsilon"] <= 3.0
    assert report["sample_rate"] == pytest.approx(batch / n_train, rel=1e-12)  # global q, not q / world
    assert report["expected_batch_size"] == pytest.approx(batch, rel=1e-12)
    assert report["steps"] == 2 * int(n_train / batch)
    assert report["history"] == [[report["noise_multiplier"], report["sample_rate"], report["steps"]]]
    for cls, key in ((PRVAccountant, "epsilon_prv"), (RDPAccountant, "epsilon_rdp")):
        acc = cls()  # a fresh accountant from the global batch's q and the steps taken
        acc.history = [(report["noise_multiplier"], batch / n_train, 2 * int(n_train / batch))]
        assert acc.get_epsilon(delta=report["delta"]) == pytest.approx(report[key], rel=1e-9)
    assert report["epsilon"] == report["epsilon_prv"]
    assert report["audit/epsilon_lower_bound"] <= report["epsilon"]
    # the budget stop's checkpoint (written with a barrier on every rank) exists and holds the accountant
    state = torch.load(tmp_path / "checkpoints" / "privacy_budget_stop.ckpt", map_location="cpu", weights_only=True)
    assert state["privacy_accountant"]["history"] == report["history"]


def test_privacy_dp_sets_its_training_defaults_and_the_command_line_wins(tmp_path):
    import functools

    from within.pipeline.privacy import dp_scheduler
    from within.privacy.engine import PrivacyConfigError

    cfg = compose_cfg("train", ["privacy=dp"], tmp_path)
    assert cfg.data.batch_size == 4096 and cfg.privacy.lr_decay == 0.9 and cfg.privacy.max_grad_norm == 10.0
    assert cfg.model.scheduler.gamma == 0.7  # the model's own schedule is untouched; DP replaces gamma
    cfg = compose_cfg("train", ["privacy=dp", "data.batch_size=2048", "privacy.lr_decay=0.8"], tmp_path)
    assert cfg.data.batch_size == 2048 and cfg.privacy.lr_decay == 0.8
    exp = functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.7)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert dp_scheduler(exp, 0.9)(opt).gamma == 0.9 and dp_scheduler(exp, None) is exp
    with pytest.raises(PrivacyConfigError, match=r"privacy.lr_decay=1.5: must be in \(0, 1\]"):
        dp_scheduler(exp, 1.5)
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3)
    assert dp_scheduler(cosine, 0.9) is cosine and dp_scheduler(None, 0.9) is None  # no gamma: kept as is
