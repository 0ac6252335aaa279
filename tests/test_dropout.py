import itertools

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from within.lit.dynamics import AdaptiveDropoutTuner
from within.nn.dropout import AdaptiveDropout, default_regularisation


def test_eval_identity_and_train_drops_with_group_rate():
    drop = AdaptiveDropout(p=0.3, groups=("text", "image"))
    x = torch.ones(20000)
    drop.eval()
    assert torch.equal(drop(x, "text"), x)
    drop.train()
    out = drop(x, "text")
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)  # inverted scaling keeps the mean
    drop.rates[1] = 0.0
    assert torch.equal(drop(x, "image"), x)


def test_forward_without_group_drops_with_the_layer_rate():
    drop = AdaptiveDropout(p=0.2)
    x = torch.ones(50_000)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    assert (drop(x) == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    drop.rates.copy_(torch.tensor([0.1, 0.2, 0.45], dtype=torch.float64))
    assert (drop(x) == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)  # the mean group rate
    # layer-wide gradient norms (not per group) steer every group alike
    rates = AdaptiveDropout(p=0.2, step_size=0.05).update_rate([0.01, 10.0, 0.01, 0.01])
    assert rates == pytest.approx({"text": 0.25, "image": 0.25, "tabular": 0.25})


def test_widening_gap_raises_rates_and_stays_in_range():
    drop = AdaptiveDropout(p=0.1, adaptive_range=(0.0, 0.3), step_size=0.05, window_size=3)
    rates = []
    for epoch in range(10):
        rates.append(drop.update_rate(train_loss=0.5 - 0.02 * epoch, val_loss=0.5 + 0.03 * epoch)["text"])
    assert rates[0] == pytest.approx(0.1)  # one observation: no trend yet, no change
    assert rates[1] > rates[0]
    assert all(b >= a for a, b in itertools.pairwise(rates))
    assert max(rates) == pytest.approx(0.3)
    assert list(drop.get_current_rate().values()) == pytest.approx([0.3, 0.3, 0.3])


def test_shrinking_gap_lowers_rates():
    drop = AdaptiveDropout(p=0.2, step_size=0.05, momentum=0.0)
    for epoch in range(3):
        drop.update_rate(train_loss=0.4, val_loss=0.8 - 0.1 * epoch)
    # First call has no trend yet; the next two see a narrowing gap.
    assert drop.get_current_rate("tabular") == pytest.approx(0.1)


def test_constant_offset_is_not_overfitting():
    drop = AdaptiveDropout(p=0.2, step_size=0.05)
    for _ in range(4):
        drop.update_rate(train_loss=0.3, val_loss=0.5)
    assert drop.get_current_rate("text") < 0.2


def test_gradient_noise_is_per_group():
    drop = AdaptiveDropout(p=0.2, step_size=0.05)
    rates = drop.update_rate({"image": [0.01, 10.0, 0.01, 0.01], "text": [1.0, 1.01, 0.99, 1.0]})
    assert rates["image"] == pytest.approx(0.25)
    assert rates["text"] == pytest.approx(0.15)
    assert rates["tabular"] == pytest.approx(0.2)  # no signal for this group


def test_gradient_history_spans_the_last_window_size_calls():
    drop = AdaptiveDropout(p=0.2, step_size=0.05, window_size=2)
    assert drop.update_rate({"image": [1.0, 1.0]})["image"] == pytest.approx(0.15)  # calm
    assert drop.update_rate({"image": [0.01, 10.0]})["image"] == pytest.approx(0.2)  # noisy over both calls
    # the noisy call is still in the two-call window: std/mean of [1, 1, 0.01, 10] = 1.35 > 1
    assert drop.update_rate({"image": [1.0, 1.0]})["image"] == pytest.approx(0.25)
    assert drop.update_rate({"image": [1.0, 1.0]})["image"] == pytest.approx(0.2)  # it left the window
    assert drop.get_current_rate("text") == pytest.approx(0.2)  # no norms for text: no signal, no change
    # one norm per call still counts once the history holds two
    one = AdaptiveDropout(p=0.2, step_size=0.05, window_size=3)
    assert one.update_rate({"text": [1.0]})["text"] == pytest.approx(0.2)
    assert one.update_rate({"text": [9.0]})["text"] == pytest.approx(0.15)  # std/mean of [1, 9] = 0.8


def test_checkpoint_without_gradient_history_loads():
    drop = AdaptiveDropout(p=0.1)
    drop.update_rate({"text": [1.0, 9.0]})
    old = {k: v for k, v in drop.state_dict().items() if k != "grad_window"}
    fresh = AdaptiveDropout(p=0.1)
    fresh.load_state_dict(old)  # strict: the missing history is started empty
    assert fresh.get_current_rate() == drop.get_current_rate() and not fresh.grad_window.any()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.floats(0, 5)), min_size=1, max_size=15),
       st.floats(0.0, 0.4))
def test_rates_stay_in_range(losses, p):
    drop = AdaptiveDropout(p=p, adaptive_range=(0.0, 0.4), step_size=0.07)
    for train, val in losses:
        for r in drop.update_rate(train_loss=train, val_loss=val).values():
            assert 0.0 <= r <= 0.4


def test_reset_restores_initial_state():
    drop = AdaptiveDropout(p=0.1)
    initial = {k: v.clone() for k, v in drop.state_dict().items()}
    for epoch in range(4):
        drop.update_rate({"text": [1.0, 9.0]}, train_loss=0.5, val_loss=0.5 + 0.1 * epoch)
    assert drop.get_current_rate("text") != pytest.approx(0.1)
    drop.reset()
    for k, v in drop.state_dict().items():
        assert torch.equal(v, initial[k]), k


def test_state_is_checkpointed():
    drop = AdaptiveDropout(p=0.1)
    for epoch in range(3):
        drop.update_rate(train_loss=0.5, val_loss=0.5 + 0.1 * epoch)
    fresh = AdaptiveDropout(p=0.1)
    fresh.load_state_dict(drop.state_dict())
    assert fresh.update_rate(train_loss=0.5, val_loss=0.9) == drop.update_rate(train_loss=0.5, val_loss=0.9)


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="group='audio'"):
        AdaptiveDropout()(torch.ones(3), "audio")
    with pytest.raises(ValueError, match="adaptive_range"):
        AdaptiveDropout(p=0.6)
    with pytest.raises(ValueError, match="train_loss and val_loss"):
        AdaptiveDropout().update_rate(train_loss=0.3)
    with pytest.raises(ValueError, match="n_rows"):
        default_regularisation(0, 10)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10**8), st.integers(1, 10**8), st.integers(1, 10**8))
def test_default_regularisation_is_monotone(rows, features, extra):
    base = default_regularisation(rows, features)
    more_rows = default_regularisation(rows + extra, features)
    more_features = default_regularisation(rows, features + extra)
    assert more_rows["dropout"] <= base["dropout"] and more_rows["weight_decay"] <= base["weight_decay"]
    assert more_features["dropout"] >= base["dropout"]
    assert more_features["weight_decay"] >= base["weight_decay"]
    assert 0.05 <= base["dropout"] <= 0.5


def test_default_regularisation_values():
    assert default_regularisation(100, 100) == {"dropout": 0.5, "weight_decay": 0.01}
    assert default_regularisation(100_000, 100) == pytest.approx({"dropout": 0.2, "weight_decay": 1e-5})


class _Overfit(pl.LightningModule):
    """Reports a val loss that grows each epoch while the train loss falls."""

    def __init__(self):
        super().__init__()
        self.text_encoder = nn.Linear(4, 4)
        self.tabular_encoder = nn.Linear(4, 4)
        # Threshold out of reach: gradient norms are a signal that never says "noisy".
        self.drop = AdaptiveDropout(p=0.1, step_size=0.05, noise_threshold=1e9)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.cat([self.drop(self.text_encoder(x), "text"), self.drop(self.tabular_encoder(x), "tabular")], -1)
        return nn.functional.binary_cross_entropy_with_logits(self.head(h).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/logloss", 1.0 + 0.5 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_tuner_callback_raises_rates_on_widening_gap(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)).float())
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = _Overfit()
    tuner = AdaptiveDropoutTuner()
    trainer = pl.Trainer(max_epochs=3, callbacks=[tuner], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    rates = module.drop.get_current_rate()
    # Epoch 1: no trend yet; text/tabular have calm gradients (a step down), image has no
    # parameters (no signal). Epochs 2-3: a widening gap raises every group.
    assert rates["text"] == pytest.approx(0.15) and rates["tabular"] == pytest.approx(0.15)
    assert rates["image"] == pytest.approx(0.2)
    assert float(trainer.callback_metrics["train/dropout_tabular"]) == pytest.approx(rates["tabular"])


def test_fast_dropout_keeps_the_rate_scale_and_seed():
    """FastDropout (the tower's dropout): drops about p of the entries, scales the rest so the mean is
    kept, is the identity in eval mode, and repeats under torch.manual_seed."""
    from within.nn.dropout import FastDropout, keep_mask

    layer = FastDropout(0.2).train()
    x = torch.ones(1000, 500)
    torch.manual_seed(4)
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    torch.manual_seed(4)
    assert torch.equal(layer(x), y)
    assert torch.equal(layer.eval()(x), x)
    lanes = keep_mask((100_000, 4), 0.5).float().mean(dim=0)  # column j: lane j of every 64-bit draw
    assert torch.allclose(lanes, torch.full((4,), 0.5), atol=0.01)
