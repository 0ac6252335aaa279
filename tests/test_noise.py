import math

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from within.lit.dynamics import NoiseAnnealing
from within.nn.noise import QuantumNoiseLayer


@pytest.mark.parametrize(
    "schedule,step,expected",
    [
        ("constant", 0, 0.2),
        ("constant", 1000, 0.2),
        ("linear", 0, 0.2),
        ("linear", 500, 0.2 * (1 - 0.9 * 0.5)),
        ("linear", 1000, 0.2 * 0.1),
        ("linear", 5000, 0.2 * 0.1),  # clipped past the end
        ("cosine", 0, 0.2),
        ("cosine", 500, 0.2 * (0.1 + 0.9 * 0.5)),
        ("cosine", 1000, 0.2 * 0.1),
        ("exponential", 0, 0.2),
        ("exponential", 500, 0.2 * 0.1**0.5),
        ("exponential", 1000, 0.2 * 0.1),
    ],
)
def test_schedule_values(schedule, step, expected):
    layer = QuantumNoiseLayer(8, noise_intensity=0.2, annealing_schedule=schedule, total_steps=1000, final_ratio=0.1)
    assert layer.update_schedule(step) == pytest.approx(expected)
    assert layer.get_current_noise_level() == pytest.approx(expected, rel=1e-6)


def test_exponential_to_zero_uses_floor():
    layer = QuantumNoiseLayer(4, annealing_schedule="exponential", total_steps=10, final_ratio=0.0, exp_floor=1e-3)
    assert layer.update_schedule(10) == pytest.approx(0.1 * 1e-3)


def test_level_is_checkpointed_buffer():
    layer = QuantumNoiseLayer(4, annealing_schedule="linear", total_steps=10)
    layer.update_schedule(5)
    fresh = QuantumNoiseLayer(4, annealing_schedule="linear", total_steps=10)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.get_current_noise_level() == pytest.approx(0.05)


@pytest.mark.parametrize("noise_type", ["phase", "gaussian", "multiplicative"])
def test_eval_is_identity_and_train_is_noisy(noise_type):
    layer = QuantumNoiseLayer(6, noise_type=noise_type, noise_intensity=0.5)
    x = torch.randn(32, 6)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), x)


@settings(max_examples=30, deadline=None)
@given(channels=st.integers(1, 9), batch=st.integers(1, 5), sigma=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_phase_noise_preserves_pair_norms(channels, batch, sigma, seed):
    torch.manual_seed(seed)
    layer = QuantumNoiseLayer(channels, noise_type="phase", noise_intensity=sigma).train()
    x = torch.randn(batch, channels, dtype=torch.float64)
    out = layer(x)
    k = channels // 2
    pairs_in = x[:, : 2 * k].reshape(batch, k, 2).norm(dim=-1)
    pairs_out = out[:, : 2 * k].reshape(batch, k, 2).norm(dim=-1)
    torch.testing.assert_close(pairs_out, pairs_in)
    if channels % 2:
        assert torch.equal(out[:, -1], x[:, -1])


def test_phase_noise_spread_matches_sigma():
    torch.manual_seed(0)
    layer = QuantumNoiseLayer(2, noise_type="phase", noise_intensity=0.1).train()
    x = torch.tensor([[1.0, 0.0]]).repeat(20000, 1)
    out = layer(x)
    theta = torch.atan2(out[:, 1], out[:, 0])
    assert theta.std().item() == pytest.approx(0.1 * math.pi, rel=0.05)


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="noise_type"):
        QuantumNoiseLayer(4, noise_type="quantum")
    with pytest.raises(ValueError, match="final_ratio"):
        QuantumNoiseLayer(4, final_ratio=2.0)
    with pytest.raises(ValueError, match="channels=4"):
        QuantumNoiseLayer(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="total_steps"):
        QuantumNoiseLayer(4, total_steps=None).update_schedule(3)


class _Noisy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.noise = QuantumNoiseLayer(4, noise_type="gaussian", noise_intensity=0.4,
                                       annealing_schedule="linear", total_steps=None)
        self.head = nn.Linear(4, 1)
        self.levels = []

    def training_step(self, batch, batch_idx):
        self.levels.append(self.noise.get_current_noise_level())
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self.head(self.noise(x)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_noise_annealing_callback(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)).float())
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = _Noisy()
    trainer = pl.Trainer(max_epochs=1, callbacks=[NoiseAnnealing()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert module.noise.total_steps == 10
    expected = [0.4 * (1 - s / 10) for s in range(10)]
    assert module.levels == pytest.approx(expected, rel=1e-5)
    assert module.noise.get_current_noise_level() == pytest.approx(0.0, abs=1e-7)
    assert "train/noise_level" in trainer.callback_metrics


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_train_py_logs_noise_level_on_its_schedule(tmp_path, schedule):
    """`python train.py model=nn model.net.enable_quantum_noise=true`: the logged train/noise_level is
    noise_intensity * schedule(step / total_steps), total_steps being the run's optimizer steps."""
    import pandas as pd

    from tests.conftest import FAST, compose_cfg
    from within.nn.noise import schedule_factor
    from within.pipeline.train import run_train

    cfg = compose_cfg("train", FAST + [
        "model.net.enable_quantum_noise=true", f"model.net.noise.annealing_schedule={schedule}",
        "model.net.noise.noise_intensity=0.3", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "logger=csv", "postfit=[]",
    ], out_dir=tmp_path)
    run_train(cfg)
    logged = pd.read_csv(tmp_path / "csv" / "metrics.csv").dropna(subset=["train/noise_level"])
    total = int(logged["step"].max()) + 1  # one level per optimizer step, all of them logged
    assert len(logged) == total >= 10
    # the level logged after optimizer step s is the one set for the next step, s + 1
    expected = [0.3 * schedule_factor(schedule, (s + 1) / total, 0.0) for s in logged["step"]]
    assert logged["train/noise_level"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert logged["train/noise_level"].iloc[-1] == pytest.approx(0.0, abs=1e-6)
